/* asyncfs.io._uring: the io_uring binding asyncfs builds for itself, over Debian's liburing.
 *
 * It owns one ring and exactly what the image backend needs of it: vectored reads (optionally
 * held back in the kernel by a linked timeout), cancelling those timeouts, submitting, and
 * reaping completions as (user_data, result) pairs.
 *
 * It also owns the lifetime of the memory the kernel writes into: a read takes a buffer
 * export (PyObject_GetBuffer) of every buffer it is given and releases it when that read's
 * completion is reaped, never before. A buffer therefore cannot be resized or freed while the
 * kernel may still write into it, and no export outlives its read. At close, the exports of
 * reads that never completed are kept for good (the kernel may still write there).
 *
 * Each SQE carries a pointer to its read's record as user_data; timeouts and cancels carry 0
 * (DELAY_TAG), so one cancel-all by 0 ends every pending delay and no read matches it.
 *
 * Built with the compiler's baseline flags for the target (see setup.py): no instruction
 * beyond what every CPU of the architecture has.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <limits.h>
#include <liburing.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#define DELAY_TAG 0

/* One read in the kernel: the caller's id, its buffers' exports and the iovecs over them. */
typedef struct rd {
    struct rd *prev, *next; /* the ring's list of reads not yet reaped */
    unsigned long long user_data;
    Py_ssize_t nbuf;
    struct iovec *iov;
    Py_buffer *bufs;
    struct __kernel_timespec delay; /* read by the kernel when the linked timeout is submitted */
    struct iovec iov1;              /* storage for the common one-buffer read */
    Py_buffer buf1;
} rd_t;

typedef struct {
    PyObject_HEAD
    struct io_uring ring;
    int open;
    rd_t live; /* sentinel of the circular list of reads not yet reaped */
    Py_ssize_t nlive;
} RingObject;

static PyObject *
errno_error(int err)
{
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static void
rd_release(rd_t *r)
{
    for (Py_ssize_t i = 0; i < r->nbuf; i++)
        PyBuffer_Release(&r->bufs[i]);
    if (r->bufs != &r->buf1)
        PyMem_Free(r->bufs);
    if (r->iov != &r->iov1)
        PyMem_Free(r->iov);
    PyMem_Free(r);
}

static void
rd_link(RingObject *self, rd_t *r)
{
    r->next = self->live.next;
    r->prev = &self->live;
    self->live.next->prev = r;
    self->live.next = r;
    self->nlive++;
}

static void
rd_unlink(RingObject *self, rd_t *r)
{
    r->prev->next = r->next;
    r->next->prev = r->prev;
    self->nlive--;
}

/* Exports of every buffer in `obj` (one buffer, or a list/tuple of them), writable and
 * contiguous; NULL with an exception set on failure (nothing left exported). */
static rd_t *
rd_new(PyObject *obj)
{
    rd_t *r = PyMem_Calloc(1, sizeof(rd_t));
    if (r == NULL)
        return (rd_t *)PyErr_NoMemory();
    if (PyObject_CheckBuffer(obj)) {
        if (PyObject_GetBuffer(obj, &r->buf1, PyBUF_WRITABLE) < 0) {
            PyMem_Free(r);
            return NULL;
        }
        r->bufs = &r->buf1;
        r->iov = &r->iov1;
        r->nbuf = 1;
        r->iov1.iov_base = r->buf1.buf;
        r->iov1.iov_len = (size_t)r->buf1.len;
        return r;
    }
    PyObject *seq = PySequence_Fast(obj, "buffers must be a buffer or a sequence of buffers");
    if (seq == NULL) {
        PyMem_Free(r);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > IOV_MAX) {
        Py_DECREF(seq);
        PyMem_Free(r);
        PyErr_Format(PyExc_ValueError, "a read takes 1 to %d buffers, not %zd", IOV_MAX, n);
        return NULL;
    }
    if (n == 1) {
        r->bufs = &r->buf1;
        r->iov = &r->iov1;
    } else {
        r->bufs = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
        r->iov = PyMem_Calloc((size_t)n, sizeof(struct iovec));
        if (r->bufs == NULL || r->iov == NULL) {
            PyMem_Free(r->bufs);
            PyMem_Free(r->iov);
            PyMem_Free(r);
            Py_DECREF(seq);
            return (rd_t *)PyErr_NoMemory();
        }
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(items[i], &r->bufs[i], PyBUF_WRITABLE) < 0) {
            r->nbuf = i; /* release those taken so far */
            Py_DECREF(seq);
            rd_release(r);
            return NULL;
        }
        r->iov[i].iov_base = r->bufs[i].buf;
        r->iov[i].iov_len = (size_t)r->bufs[i].len;
    }
    r->nbuf = n;
    Py_DECREF(seq);
    return r;
}

static int
check_open(RingObject *self)
{
    if (!self->open) {
        PyErr_SetString(PyExc_ValueError, "the ring is closed");
        return -1;
    }
    return 0;
}

static PyObject *
Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"entries", NULL};
    unsigned int entries = 128;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|I", kwlist, &entries))
        return NULL;
    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->live.next = self->live.prev = &self->live;
    int ret = io_uring_queue_init(entries, &self->ring, 0);
    if (ret < 0) {
        Py_DECREF(self);
        return errno_error(-ret);
    }
    self->open = 1;
    return (PyObject *)self;
}

/* Reads still in the kernel at close keep their exports: their memory must stay valid. */
static Py_ssize_t
ring_close(RingObject *self)
{
    if (!self->open)
        return 0;
    self->open = 0;
    io_uring_queue_exit(&self->ring);
    Py_ssize_t abandoned = self->nlive;
    self->live.next = self->live.prev = &self->live;
    self->nlive = 0;
    return abandoned;
}

static void
Ring_dealloc(RingObject *self)
{
    ring_close(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

PyDoc_STRVAR(readv_doc,
"readv(fd, buffers, offset, user_data, delay=0.0) -> bool\n\n"
"Prepare a vectored read of fd at offset into buffers (one writable buffer, or a sequence\n"
"of them), completing as (user_data, result); user_data must not be 0. With delay > 0 a\n"
"timeout linked ahead of it holds the read back that many seconds in the kernel. Each\n"
"buffer stays exported until the completion is reaped. False (nothing prepared) when the\n"
"submission queue has no room: submit() and try again.");

static PyObject *
Ring_readv(RingObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 4 || nargs > 5) {
        PyErr_SetString(PyExc_TypeError, "readv(fd, buffers, offset, user_data, delay=0.0)");
        return NULL;
    }
    if (check_open(self) < 0)
        return NULL;
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad file descriptor");
        return NULL;
    }
    unsigned long long offset = PyLong_AsUnsignedLongLong(args[2]);
    if (offset == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long user_data = PyLong_AsUnsignedLongLong(args[3]);
    if (user_data == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (user_data == DELAY_TAG) {
        PyErr_SetString(PyExc_ValueError, "user_data 0 is reserved for delays");
        return NULL;
    }
    double delay = 0.0;
    if (nargs == 5) {
        delay = PyFloat_AsDouble(args[4]);
        if (delay == -1.0 && PyErr_Occurred())
            return NULL;
        if (!isfinite(delay) || delay < 0) {
            PyErr_SetString(PyExc_ValueError, "delay must be a finite number >= 0");
            return NULL;
        }
    }
    /* A taken SQE is submitted whatever it holds, so room for all of them is checked before
     * any is taken, and the exports are taken before that (they can fail). */
    unsigned need = delay > 0 ? 2 : 1;
    if (io_uring_sq_space_left(&self->ring) < need)
        Py_RETURN_FALSE;
    rd_t *r = rd_new(args[1]);
    if (r == NULL)
        return NULL;
    r->user_data = user_data;
    if (delay > 0) {
        double whole = floor(delay);
        r->delay.tv_sec = (long long)whole;
        r->delay.tv_nsec = (long long)((delay - whole) * 1e9);
        struct io_uring_sqe *t = io_uring_get_sqe(&self->ring);
        io_uring_prep_timeout(t, &r->delay, 0, IORING_TIMEOUT_ETIME_SUCCESS);
        io_uring_sqe_set_flags(t, IOSQE_IO_LINK);
        io_uring_sqe_set_data64(t, DELAY_TAG);
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&self->ring);
    io_uring_prep_readv(sqe, (int)fd, r->iov, (unsigned)r->nbuf, offset);
    io_uring_sqe_set_data(sqe, r);
    rd_link(self, r);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(cancel_delays_doc,
"cancel_delays() -> bool\n\n"
"Prepare one cancel of every pending delay (their reads then complete with ECANCELED).\n"
"False when the submission queue has no room.");

static PyObject *
Ring_cancel_delays(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    struct io_uring_sqe *sqe = io_uring_get_sqe(&self->ring);
    if (sqe == NULL)
        Py_RETURN_FALSE;
    io_uring_prep_cancel64(sqe, DELAY_TAG, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(sqe, DELAY_TAG);
    Py_RETURN_TRUE;
}

PyDoc_STRVAR(submit_doc,
"submit() -> int\n\n"
"Hand every prepared SQE to the kernel in one io_uring_enter; the number submitted.\n"
"0 when the kernel asks to try later (EAGAIN, EBUSY, EINTR): they stay prepared.");

static PyObject *
Ring_submit(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    if (io_uring_sq_ready(&self->ring) == 0)
        return PyLong_FromLong(0);
    int ret;
    /* Buffered reads of cached pages are copied inside the call: other threads may run. */
    Py_BEGIN_ALLOW_THREADS
    ret = io_uring_submit(&self->ring);
    Py_END_ALLOW_THREADS
    if (ret == -EAGAIN || ret == -EBUSY || ret == -EINTR)
        return PyLong_FromLong(0);
    if (ret < 0)
        return errno_error(-ret);
    return PyLong_FromLong(ret);
}

PyDoc_STRVAR(reap_doc,
"reap() -> list[tuple[int, int]]\n\n"
"Every completion ready now, as (user_data, result) with result a byte count or -errno;\n"
"the completions of delays and cancels are consumed and not listed. Each listed read's\n"
"buffers are released.");

static PyObject *
Ring_reap(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;
    io_uring_for_each_cqe(&self->ring, head, cqe) {
        seen++;
        if (cqe->user_data == DELAY_TAG)
            continue;
        rd_t *r = (rd_t *)(uintptr_t)cqe->user_data;
        PyObject *item = Py_BuildValue("(Ki)", r->user_data, cqe->res);
        rd_unlink(self, r);
        rd_release(r);
        if (item == NULL || PyList_Append(out, item) < 0) {
            /* The record is gone; its completion is lost, as the caller's failure says. */
            Py_XDECREF(item);
            io_uring_cq_advance(&self->ring, seen);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(item);
    }
    io_uring_cq_advance(&self->ring, seen);
    return out;
}

PyDoc_STRVAR(close_doc,
"close() -> int\n\n"
"Tear the ring down (the kernel cancels or finishes what is in flight). Returns the number\n"
"of reads never reaped, whose buffers stay exported for good.");

static PyObject *
Ring_close(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSsize_t(ring_close(self));
}

static PyObject *
Ring_sq_space_left(RingObject *self, PyObject *Py_UNUSED(ignored))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(io_uring_sq_space_left(&self->ring));
}

static PyObject *
Ring_get_fd(RingObject *self, void *Py_UNUSED(closure))
{
    if (check_open(self) < 0)
        return NULL;
    return PyLong_FromLong(self->ring.ring_fd);
}

static PyObject *
Ring_get_prepared(RingObject *self, void *Py_UNUSED(closure))
{
    if (!self->open)
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLong(io_uring_sq_ready(&self->ring));
}

static PyObject *
Ring_get_in_kernel(RingObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->nlive);
}

static PyObject *
Ring_get_closed(RingObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(!self->open);
}

static PyMethodDef Ring_methods[] = {
    {"readv", (PyCFunction)(void (*)(void))Ring_readv, METH_FASTCALL, readv_doc},
    {"cancel_delays", (PyCFunction)Ring_cancel_delays, METH_NOARGS, cancel_delays_doc},
    {"submit", (PyCFunction)Ring_submit, METH_NOARGS, submit_doc},
    {"reap", (PyCFunction)Ring_reap, METH_NOARGS, reap_doc},
    {"close", (PyCFunction)Ring_close, METH_NOARGS, close_doc},
    {"sq_space_left", (PyCFunction)Ring_sq_space_left, METH_NOARGS,
     "sq_space_left() -> int: free SQEs"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"fd", (getter)Ring_get_fd, NULL, "the ring's file descriptor (readable while CQEs wait)",
     NULL},
    {"prepared", (getter)Ring_get_prepared, NULL, "SQEs prepared and not yet submitted", NULL},
    {"in_kernel", (getter)Ring_get_in_kernel, NULL, "reads prepared and not yet reaped", NULL},
    {"closed", (getter)Ring_get_closed, NULL, "whether close() ran", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncfs.io._uring.Ring",
    .tp_doc = PyDoc_STR("Ring(entries=128): one io_uring; OSError if it cannot be set up."),
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Ring_new,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
};

static struct PyModuleDef uring_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "asyncfs.io._uring",
    .m_doc = PyDoc_STR("asyncfs's own io_uring binding (see the source's header)."),
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    if (PyType_Ready(&RingType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&uring_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(m, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
