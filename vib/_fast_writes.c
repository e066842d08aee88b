/*
 * vib._fast_writes: the tap's write path for runs of plain NBD writes, in C.
 *
 * At 4 KiB and queue depth 16 the tap's event loop spent most of its time in the
 * interpreter per write (parse the request, check the activity log, pwrite, number it,
 * build and later encode its journal record, queue the reply). For the common case,
 * a complete NBD_CMD_WRITE without flags into an extent already hot, all of that is done
 * here, for as many such requests as follow one another in the receive buffer:
 *
 *   1. the request header is parsed and checked (magic, command, flags, bounds);
 *   2. the activity log's slot for the extent must exist and be committed (else stop);
 *   3. pwrite to the source disk (a short or failed write: stop, the Python path redoes
 *      it and reports the error);
 *   4. the write gets the next local generation and sequence number;
 *   5. its journal record (datapath.journal's layout, CRC32C over fields and data) is
 *      written into the session's chunk (vib.publisher.Chunk: a buffer of one frame's
 *      size, filled in place and reused, where a bytearray grown a few bytes at a time
 *      would be copied over and over by realloc), its metadata appended to the chunk's
 *      meta;
 *   6. the slot is stamped (last_gen, tick) and a simple reply is queued.
 *
 * Anything else stops the run at that request, which the Python path then handles
 * (vib.nbd.connection, vib.vm_tap): the two paths share every piece of state, so the
 * order of sequence numbers is still the order of application to the disk.
 *
 * The record layout must stay byte-identical to datapath/journal.py (tests compare both
 * encoders); the meta layout is vib/publisher.py's META.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define REQUEST_SIZE 28
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define CMD_WRITE 1
#define RECORD_HEADER_SIZE 52
#define RECORD_KIND_WRITE 1
#define META_SIZE 40

/* ---- CRC32C (Castagnoli), hardware where the CPU has it ------------------------------ */

static uint32_t crc_table[8][256];

static void crc_init_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xff];
}

static uint32_t crc_software(uint32_t crc, const unsigned char *p, size_t n) {
    while (n && ((uintptr_t)p & 7)) {
        crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        w ^= crc;
        crc = crc_table[7][w & 0xff] ^ crc_table[6][(w >> 8) & 0xff] ^
              crc_table[5][(w >> 16) & 0xff] ^ crc_table[4][(w >> 24) & 0xff] ^
              crc_table[3][(w >> 32) & 0xff] ^ crc_table[2][(w >> 40) & 0xff] ^
              crc_table[1][(w >> 48) & 0xff] ^ crc_table[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--) crc = crc_table[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_HW_CRC 1
__attribute__((target("sse4.2"))) static uint32_t crc_hardware(uint32_t crc,
                                                                const unsigned char *p,
                                                                size_t n) {
    uint64_t c = crc;
    while (n && ((uintptr_t)p & 7)) {
        c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
        n--;
    }
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = __builtin_ia32_crc32di(c, w);
        p += 8;
        n -= 8;
    }
    while (n--) c = __builtin_ia32_crc32qi((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

static int use_hw_crc = 0;

/* The standard CRC32C of p[0:n] continued from `crc` (as crc32c.crc32c(data, crc)). */
static uint32_t crc32c(uint32_t crc, const unsigned char *p, size_t n) {
    crc = ~crc;
#ifdef HAVE_HW_CRC
    if (use_hw_crc) return ~crc_hardware(crc, p, n);
#endif
    return ~crc_software(crc, p, n);
}

/* ---- byte order helpers ------------------------------------------------------------- */

static inline uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline uint16_t be16(const unsigned char *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}
static inline void put_be32(unsigned char *p, uint32_t v) {
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}
static inline void put_le16(unsigned char *p, uint16_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
}
static inline void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static inline void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* Encodes a WRITE record's 52-byte header for `data` (datapath.journal's _RECORD). */
static void encode_write_header(unsigned char *h, uint16_t disk, uint64_t seq, uint64_t offset,
                                const unsigned char *data, uint32_t length, uint64_t ts_ns) {
    unsigned char *f = h + 4; /* the fields the CRC covers first, then the data */
    f[0] = RECORD_KIND_WRITE;
    f[1] = 0; /* marker */
    put_le16(f + 2, disk);
    put_le32(f + 4, length); /* data_len */
    put_le64(f + 8, seq);
    put_le64(f + 16, offset);
    put_le64(f + 24, length);
    put_le64(f + 32, ts_ns);
    put_le64(f + 40, 0); /* marker_id */
    uint32_t crc = crc32c(0, f, RECORD_HEADER_SIZE - 4);
    put_le32(h, crc32c(crc, data, length));
}

/* ---- FastWrites ----------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    int fd;
    uint16_t disk;
    uint64_t size;
    PyObject *hot; /* the activity log's dict: (disk << disk_shift) | extent -> Slot */
    int extent_shift;
    int disk_shift;
} FastWrites;

static PyObject *str_committed, *str_last_gen, *str_tick;

static int FastWrites_init(FastWrites *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fd", "disk", "size", "hot", "extent_shift", "disk_shift", NULL};
    int fd, disk, extent_shift, disk_shift;
    unsigned long long size;
    PyObject *hot;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiKO!ii", kwlist, &fd, &disk, &size,
                                     &PyDict_Type, &hot, &extent_shift, &disk_shift))
        return -1;
    if (disk < 0 || disk > 0xffff || disk_shift < 1 || disk_shift > 62 || extent_shift < 0 ||
        extent_shift >= disk_shift) {
        PyErr_SetString(PyExc_ValueError, "FastWrites: disk or shift out of range");
        return -1;
    }
    self->fd = fd;
    self->disk = (uint16_t)disk;
    self->size = size;
    Py_XSETREF(self->hot, Py_NewRef(hot));
    self->extent_shift = extent_shift;
    self->disk_shift = disk_shift;
    return 0;
}

static void FastWrites_dealloc(FastWrites *self) {
    Py_XDECREF(self->hot);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The committed hot slot of [offset, offset+length) if it stays in one extent, else NULL
 * (a borrowed reference). */
static PyObject *hot_slot(FastWrites *self, uint64_t offset, uint32_t length) {
    uint64_t first = offset >> self->extent_shift;
    if (((offset + length - 1) >> self->extent_shift) != first) return NULL;
    PyObject *key = PyLong_FromUnsignedLongLong(((uint64_t)self->disk << self->disk_shift) | first);
    if (key == NULL) return NULL;
    PyObject *slot = PyDict_GetItemWithError(self->hot, key);
    Py_DECREF(key);
    if (slot == NULL) return NULL;
    PyObject *committed = PyObject_GetAttr(slot, str_committed);
    if (committed == NULL) return NULL;
    int is_committed = committed == Py_True;
    Py_DECREF(committed);
    return is_committed ? slot : NULL;
}

/* Appends `extra` bytes to a bytearray; where they start, or NULL (error set). */
static unsigned char *grow(PyObject *bytearray, Py_ssize_t extra) {
    Py_ssize_t old = PyByteArray_GET_SIZE(bytearray);
    if (PyByteArray_Resize(bytearray, old + extra) < 0) return NULL;
    return (unsigned char *)PyByteArray_AS_STRING(bytearray) + old;
}

/* Takes back what grow() appended: a small shrink, which CPython does in place. */
static void shrink(PyObject *bytearray, Py_ssize_t extra) {
    if (PyByteArray_Resize(bytearray, PyByteArray_GET_SIZE(bytearray) - extra) < 0)
        PyErr_Clear();
}

PyDoc_STRVAR(run_doc,
             "run(buf, pos, end, out, body, used, meta, seq, gen, tick, room, length_max)\n"
             "-> (pos, count, data_bytes, used, seq, gen)\n\n"
             "Handles the plain NBD writes (of at most length_max bytes) that follow one\n"
             "another in buf[pos:end]: each is written to the disk, numbered `seq`, `seq + 1`,\n"
             "... and generations `gen + 1`, ..., its record written at body[used:] and its\n"
             "metadata appended to `meta` (while they fit in `body` and within `room`), its\n"
             "slot stamped with `tick`, and its reply appended to `out`.\n"
             "Stops at the first request it leaves to the caller; returns where that is, how\n"
             "many writes and data bytes it handled, the next sequence number and the last\n"
             "generation. Every step that can fail comes before the pwrite, and a failure\n"
             "(an allocation, in practice) stops the run before that request: the caller's\n"
             "path then meets, and reports, the same failure.");

static PyObject *FastWrites_run(FastWrites *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "run() takes 12 arguments");
        return NULL;
    }
    PyObject *out = args[3], *body = args[4], *meta = args[6], *tick = args[9];
    if (!PyByteArray_Check(out) || !PyByteArray_Check(body) || !PyByteArray_Check(meta)) {
        PyErr_SetString(PyExc_TypeError, "run(): out, body and meta must be bytearrays");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    Py_ssize_t end = PyLong_AsSsize_t(args[2]);
    Py_ssize_t used = PyLong_AsSsize_t(args[5]);
    unsigned long long seq = PyLong_AsUnsignedLongLong(args[7]);
    unsigned long long gen = PyLong_AsUnsignedLongLong(args[8]);
    Py_ssize_t room = PyLong_AsSsize_t(args[10]);
    Py_ssize_t length_max = PyLong_AsSsize_t(args[11]);
    if (PyErr_Occurred()) return NULL;
    if (used < 0 || used > PyByteArray_GET_SIZE(body)) {
        PyErr_SetString(PyExc_ValueError, "run(): used outside the body");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (pos < 0 || end > view.len || pos > end) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "run(): pos and end outside the buffer");
        return NULL;
    }
    const unsigned char *buf = view.buf;
    Py_ssize_t count = 0, data_bytes = 0;
    struct timespec now;
    while (end - pos >= REQUEST_SIZE) {
        const unsigned char *r = buf + pos;
        uint32_t length = be32(r + 24);
        uint64_t offset = be64(r + 16);
        if (be32(r) != REQUEST_MAGIC || be16(r + 4) != 0 || be16(r + 6) != CMD_WRITE ||
            length == 0 || (Py_ssize_t)length > length_max || offset > self->size ||
            length > self->size - offset ||
            end - pos - REQUEST_SIZE < (Py_ssize_t)length ||
            RECORD_HEADER_SIZE + (Py_ssize_t)length > room ||
            RECORD_HEADER_SIZE + (Py_ssize_t)length > PyByteArray_GET_SIZE(body) - used)
            break;
        PyObject *slot = hot_slot(self, offset, length);
        if (slot == NULL) break;
        /* Stamped before the write: a slot whose last_gen runs ahead of what was written
         * only retires later (and the caller reuses the generation if this write stops). */
        PyObject *gen_obj = PyLong_FromUnsignedLongLong(gen + 1);
        if (gen_obj == NULL) break;
        int stamped = PyObject_SetAttr(slot, str_last_gen, gen_obj) == 0 &&
                      PyObject_SetAttr(slot, str_tick, tick) == 0;
        Py_DECREF(gen_obj);
        if (!stamped) break;
        Py_ssize_t record_size = RECORD_HEADER_SIZE + (Py_ssize_t)length;
        unsigned char *m = grow(meta, META_SIZE);
        if (m == NULL) break;
        unsigned char *reply = grow(out, 16);
        if (reply == NULL) {
            shrink(meta, META_SIZE);
            break;
        }
        const unsigned char *data = r + REQUEST_SIZE;
        ssize_t done = pwrite(self->fd, data, length, (off_t)offset);
        if (done != (ssize_t)length) { /* redone, and reported, by the caller's path */
            shrink(out, 16);
            shrink(meta, META_SIZE);
            break;
        }
        unsigned char *rec = (unsigned char *)PyByteArray_AS_STRING(body) + used;
        gen += 1;
        clock_gettime(CLOCK_REALTIME, &now);
        uint64_t ts_ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
        encode_write_header(rec, self->disk, seq, offset, data, length, ts_ns);
        memcpy(rec + RECORD_HEADER_SIZE, data, length);
        /* META: seq, gen, offset, length (u64), size (u32), disk (u16), kind (u8), pad */
        put_le64(m, seq);
        put_le64(m + 8, gen);
        put_le64(m + 16, offset);
        put_le64(m + 24, length);
        put_le32(m + 32, (uint32_t)record_size);
        put_le16(m + 36, self->disk);
        m[38] = RECORD_KIND_WRITE;
        m[39] = 0;
        put_be32(reply, SIMPLE_REPLY_MAGIC);
        put_be32(reply + 4, 0);
        memcpy(reply + 8, r + 8, 8); /* the cookie, as the client sent it */
        seq += 1;
        used += record_size;
        room -= record_size;
        count += 1;
        data_bytes += length;
        pos += REQUEST_SIZE + length;
    }
    PyBuffer_Release(&view);
    PyErr_Clear(); /* whatever stopped the run, the caller's path meets it again */
    return Py_BuildValue("nnnnKK", pos, count, data_bytes, used, seq, gen);
}

PyDoc_STRVAR(encode_write_record_doc,
             "encode_write_record(disk, seq, offset, data, ts_ns) -> bytes\n\n"
             "One WRITE record as run() appends it (header then data), for tests.");

static PyObject *encode_write_record(PyObject *Py_UNUSED(module), PyObject *args) {
    unsigned int disk;
    unsigned long long seq, offset, ts_ns;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "IKKy*K", &disk, &seq, &offset, &data, &ts_ns)) return NULL;
    if (disk > 0xffff || data.len > 0xffffffffLL || data.len == 0) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "encode_write_record: disk or data out of range");
        return NULL;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, RECORD_HEADER_SIZE + data.len);
    if (result != NULL) {
        unsigned char *p = (unsigned char *)PyBytes_AS_STRING(result);
        encode_write_header(p, (uint16_t)disk, seq, offset, data.buf, (uint32_t)data.len, ts_ns);
        memcpy(p + RECORD_HEADER_SIZE, data.buf, data.len);
    }
    PyBuffer_Release(&data);
    return result;
}

PyDoc_STRVAR(crc32c_doc, "crc32c(data, value=0) -> int: CRC32C, as crc32c.crc32c (tests).");

static PyObject *py_crc32c(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer data;
    unsigned int value = 0;
    if (!PyArg_ParseTuple(args, "y*|I", &data, &value)) return NULL;
    uint32_t crc = crc32c(value, data.buf, (size_t)data.len);
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

PyDoc_STRVAR(payload_buffer_doc,
             "payload_buffer(size) -> bytearray\n\n"
             "A bytearray of `size` bytes left as malloc gave them: for a write payload that is\n"
             "received over it at once, where bytearray(size) would first zero it (measured:\n"
             "5-6 % of the tap's CPU under 1 MiB writes).");

static PyObject *payload_buffer(PyObject *Py_UNUSED(module), PyObject *arg) {
    Py_ssize_t size = PyLong_AsSsize_t(arg);
    if (size == -1 && PyErr_Occurred()) return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "payload_buffer: negative size");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, size);
}

static PyMethodDef FastWrites_methods[] = {
    {"run", (PyCFunction)(void (*)(void))FastWrites_run, METH_FASTCALL, run_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FastWritesType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "vib._fast_writes.FastWrites",
    .tp_basicsize = sizeof(FastWrites),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = PyDoc_STR("FastWrites(fd, disk, size, hot, extent_shift, disk_shift): "
                        "the C write path of one disk (see the module)."),
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)FastWrites_init,
    .tp_dealloc = (destructor)FastWrites_dealloc,
    .tp_methods = FastWrites_methods,
};

static PyMethodDef module_methods[] = {
    {"encode_write_record", encode_write_record, METH_VARARGS, encode_write_record_doc},
    {"crc32c", py_crc32c, METH_VARARGS, crc32c_doc},
    {"payload_buffer", payload_buffer, METH_O, payload_buffer_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef fast_writes_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "vib._fast_writes",
    .m_doc = "The tap's write path for runs of plain NBD writes, in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__fast_writes(void) {
    crc_init_table();
#ifdef HAVE_HW_CRC
    __builtin_cpu_init();
    use_hw_crc = __builtin_cpu_supports("sse4.2") != 0;
#endif
    str_committed = PyUnicode_InternFromString("committed");
    str_last_gen = PyUnicode_InternFromString("last_gen");
    str_tick = PyUnicode_InternFromString("tick");
    if (str_committed == NULL || str_last_gen == NULL || str_tick == NULL) return NULL;
    if (PyType_Ready(&FastWritesType) < 0) return NULL;
    PyObject *m = PyModule_Create(&fast_writes_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "FastWrites", (PyObject *)&FastWritesType) < 0 ||
        PyModule_AddIntConstant(m, "HARDWARE_CRC", use_hw_crc) < 0 ||
        PyModule_AddIntConstant(m, "META_SIZE", META_SIZE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
