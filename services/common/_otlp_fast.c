/* OTLP wire bytes for runs of services.common.server_span.ServerSpans: what
 * services/common/otlp_encode.py's encode_server_span writes, span by span, without
 * the Python-level work per span (the template key, the id and time packing, the
 * concatenations). The template parts (a route's name, kind, attributes, status and
 * flags bytes) still come from Python (otlp_encode._server_parts) on a cache miss,
 * and any span outside the template's domain (events, a trace state, no end time) is
 * handed to Python's encoder: the two stay one definition, tested against the SDK's
 * encoder (tests/unit/test_server_span.py, tests/unit/test_otlp_encode.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

PyDoc_STRVAR(MODULE_DOC,
"C encoder for runs of ServerSpans (services.common.otlp_encode).\n"
"\n"
"encode_server_spans(spans: list, cache: dict, parts, fallback) -> bytes\n"
"\n"
"The concatenation of each span's length-delimited Span field (tag 2 of ScopeSpans),\n"
"as otlp_encode.encode_server_span writes it. `cache` maps a span's template key\n"
"(name, kind, status code, status description, parent's is_remote, then each\n"
"attribute item, then each attribute value's type) to (name and kind bytes,\n"
"attributes + status + flags bytes); `parts(span, key)` makes (and caches) a missing\n"
"entry; `fallback(span)` encodes a span the template does not cover (events, a\n"
"trace state, no end time, an unhashable attribute) and returns its field bytes.\n");

static PyObject *s_context, *s_parent, *s_start_time, *s_end_time, *s_name, *s_kind, *s_status, *s_attributes,
    *s_events, *s_status_code, *s_description, *s_recorder, *s_links;

/* Where a ServerSpan type keeps its slots: read straight from the object (a
 * generic getattr per field was a third of a span's encoding). A type whose fields
 * are not all plain slots has no layout and is read with getattr. */
enum {
    F_CONTEXT,
    F_PARENT,
    F_START,
    F_END,
    F_NAME,
    F_KIND,
    F_STATUS,
    F_ATTRIBUTES,
    F_EVENTS,
    F_RECORDER,
    F_LINKS,
    NFIELDS
};
static PyObject **field_names[NFIELDS] = {&s_context, &s_parent, &s_start_time, &s_end_time, &s_name,
                                          &s_kind,    &s_status, &s_attributes, &s_events,   &s_recorder, &s_links};

typedef struct {
    PyTypeObject *type;
    Py_ssize_t offset[NFIELDS];
} Layout;

#define MAX_LAYOUTS 8
static Layout layouts[MAX_LAYOUTS];
static int n_layouts;
static PyTypeObject *no_layout[MAX_LAYOUTS];
static int n_no_layout;

static const Layout *
layout_of(PyTypeObject *tp)
{
    for (int i = 0; i < n_layouts; i++)
        if (layouts[i].type == tp)
            return &layouts[i];
    for (int i = 0; i < n_no_layout; i++)
        if (no_layout[i] == tp)
            return NULL;
    Layout l;
    l.type = tp;
    for (int f = 0; f < NFIELDS; f++) {
        PyObject *d = _PyType_Lookup(tp, *field_names[f]);
        if (d == NULL || !Py_IS_TYPE(d, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            if (n_no_layout < MAX_LAYOUTS) {
                Py_INCREF(tp);
                no_layout[n_no_layout++] = tp;
            }
            return NULL;
        }
        l.offset[f] = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    if (n_layouts == MAX_LAYOUTS)
        return NULL;
    Py_INCREF(tp);
    layouts[n_layouts] = l;
    return &layouts[n_layouts++];
}

/* Field `f` of `span` (a new reference; NULL with AttributeError when unset). */
static PyObject *
field(PyObject *span, const Layout *layout, int f)
{
    if (layout != NULL) {
        PyObject *v = *(PyObject **)((char *)span + layout->offset[f]);
        if (v != NULL) {
            Py_INCREF(v);
            return v;
        }
    }
    return PyObject_GetAttr(span, *field_names[f]);
}

/* The last Status seen and its (code, description): a route's spans share one. */
static PyObject *last_status, *last_code, *last_description;

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int
buf_reserve(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra)
        cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int
buf_put(Buf *b, const void *src, Py_ssize_t n)
{
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static Py_ssize_t
varint(unsigned char *out, uint64_t n)
{
    Py_ssize_t i = 0;
    while (n >= 0x80) {
        out[i++] = (unsigned char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    out[i++] = (unsigned char)n;
    return i;
}

/* `v` (a non-negative int below 2**(8n)) as n big-endian bytes. */
static int
uint_be(PyObject *v, unsigned char *out, Py_ssize_t n)
{
    if (!PyLong_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "span id is not an int");
        return -1;
    }
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t need = PyLong_AsNativeBytes(v, out, n, Py_ASNATIVEBYTES_BIG_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER |
                                                         Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (need < 0)
        return -1;
    if (need > n) {
        PyErr_SetString(PyExc_OverflowError, "span id too large");
        return -1;
    }
    return 0;
#else
    return _PyLong_AsByteArray((PyLongObject *)v, out, (size_t)n, 0, 0);
#endif
}

static void
le64(unsigned char *out, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        out[i] = (unsigned char)(v >> (8 * i));
}

/* The span's template key: (name, kind, status code, status description, parent's
 * is_remote, then each attribute's key and value, then each value's type), the
 * kind and code by identity (enum members; Enum's hash is Python code). Its own
 * shape: it never equals a key otlp_encode.encode_server_span makes. NULL with an
 * error set on failure. */
static PyObject *
template_key(PyObject *span, const Layout *layout, PyObject *parent, PyObject *attributes)
{
    PyObject *key = NULL, *name = NULL, *kind = NULL, *status = NULL;
    if (!PyDict_Check(attributes)) {
        PyErr_SetString(PyExc_TypeError, "attributes are not a dict");
        return NULL;
    }
    Py_ssize_t n = PyDict_GET_SIZE(attributes);
    name = field(span, layout, F_NAME);
    kind = name ? field(span, layout, F_KIND) : NULL;
    status = kind ? field(span, layout, F_STATUS) : NULL;
    if (status == NULL)
        goto done;
    if (status != last_status) {
        PyObject *code = PyObject_GetAttr(status, s_status_code);
        PyObject *description = code ? PyObject_GetAttr(status, s_description) : NULL;
        if (description == NULL) {
            Py_XDECREF(code);
            goto done;
        }
        Py_XSETREF(last_code, code);
        Py_XSETREF(last_description, description);
        Py_INCREF(status);
        Py_XSETREF(last_status, status);
    }
    PyObject *remote = Py_False;
    if (parent != Py_None) {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 3) {
            PyErr_SetString(PyExc_TypeError, "parent is not a SpanContext");
            goto done;
        }
        remote = PyTuple_GET_ITEM(parent, 2);
    }
    key = PyTuple_New(5 + 3 * n);
    if (key == NULL)
        goto done;
    PyObject *kind_id = PyLong_FromVoidPtr(kind), *code_id = PyLong_FromVoidPtr(last_code);
    if (kind_id == NULL || code_id == NULL) {
        Py_XDECREF(kind_id);
        Py_XDECREF(code_id);
        Py_CLEAR(key);
        goto done;
    }
    PyTuple_SET_ITEM(key, 0, name);
    name = NULL; /* the key owns it */
    PyTuple_SET_ITEM(key, 1, kind_id);
    PyTuple_SET_ITEM(key, 2, code_id);
    Py_INCREF(last_description);
    PyTuple_SET_ITEM(key, 3, last_description);
    Py_INCREF(remote);
    PyTuple_SET_ITEM(key, 4, remote);
    Py_ssize_t pos = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(attributes, &pos, &k, &v)) {
        if (i >= n) {
            PyErr_SetString(PyExc_RuntimeError, "attributes changed size");
            Py_CLEAR(key);
            goto done;
        }
        Py_INCREF(k);
        PyTuple_SET_ITEM(key, 5 + 2 * i, k);
        Py_INCREF(v);
        PyTuple_SET_ITEM(key, 6 + 2 * i, v);
        Py_INCREF(Py_TYPE(v));
        PyTuple_SET_ITEM(key, 5 + 2 * n + i, (PyObject *)Py_TYPE(v));
        i++;
    }
done:
    Py_XDECREF(name);
    Py_XDECREF(kind);
    Py_XDECREF(status);
    return key;
}

/* 1: the template covers `span` (and *parts is its (name_kind, tail) tuple, a new
 * reference); 0: hand it to the fallback; -1: an error. */
static int
span_parts(PyObject *span, const Layout *layout, PyObject *ctx, PyObject *parent, PyObject *cache,
           PyObject *make_parts, PyObject **parts)
{
    PyObject *events = field(span, layout, F_EVENTS);
    if (events == NULL)
        return -1;
    int has_events = PyObject_IsTrue(events);
    Py_DECREF(events);
    if (has_events != 0)
        return has_events < 0 ? -1 : 0;
    int has_state = PyObject_IsTrue(PyTuple_GET_ITEM(ctx, 4));
    if (has_state != 0)
        return has_state < 0 ? -1 : 0;
    PyObject *attributes = field(span, layout, F_ATTRIBUTES);
    if (attributes == NULL)
        return -1;
    PyObject *key = template_key(span, layout, parent, attributes);
    Py_DECREF(attributes);
    if (key == NULL)
        return -1;
    PyObject *hit = PyDict_GetItemWithError(cache, key);
    if (hit != NULL) {
        Py_INCREF(hit);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {  /* an unhashable value */
            PyErr_Clear();
            return 0;
        }
        return -1;
    } else {
        hit = PyObject_CallFunctionObjArgs(make_parts, span, key, NULL);
    }
    Py_DECREF(key);
    if (hit == NULL)
        return -1;
    if (!PyTuple_Check(hit) || PyTuple_GET_SIZE(hit) != 2 || !PyBytes_Check(PyTuple_GET_ITEM(hit, 0)) ||
        !PyBytes_Check(PyTuple_GET_ITEM(hit, 1))) {
        Py_DECREF(hit);
        PyErr_SetString(PyExc_TypeError, "template parts must be (bytes, bytes)");
        return -1;
    }
    *parts = hit;
    return 1;
}

static int
put_fallback(Buf *out, PyObject *fallback, PyObject *span)
{
    PyObject *encoded = PyObject_CallOneArg(fallback, span);
    if (encoded == NULL)
        return -1;
    if (!PyBytes_Check(encoded)) {
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_TypeError, "fallback must return bytes");
        return -1;
    }
    int rc = buf_put(out, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
    Py_DECREF(encoded);
    return rc;
}

/* One span into `out`; -1 on error. */
static int
encode_one(Buf *out, PyObject *span, PyObject *cache, PyObject *make_parts, PyObject *fallback)
{
    int rc = -1;
    PyObject *ctx = NULL, *parent = NULL, *start = NULL, *end = NULL, *parts = NULL;
    const Layout *layout = layout_of(Py_TYPE(span));
    ctx = field(span, layout, F_CONTEXT);
    if (ctx == NULL)
        goto done;
    if (!PyTuple_Check(ctx) || PyTuple_GET_SIZE(ctx) < 5) {
        rc = put_fallback(out, fallback, span);
        goto done;
    }
    end = field(span, layout, F_END);
    if (end == NULL)
        goto done;
    if (!PyLong_Check(end)) {  /* not ended */
        rc = put_fallback(out, fallback, span);
        goto done;
    }
    parent = field(span, layout, F_PARENT);
    start = parent ? field(span, layout, F_START) : NULL;
    if (start == NULL)
        goto done;
    if (!PyLong_Check(start) || (parent != Py_None && (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 3))) {
        rc = put_fallback(out, fallback, span);
        goto done;
    }
    int covered = span_parts(span, layout, ctx, parent, cache, make_parts, &parts);
    if (covered < 0)
        goto done;
    if (covered == 0) {
        rc = put_fallback(out, fallback, span);
        goto done;
    }
    uint64_t start_ns = PyLong_AsUnsignedLongLong(start), end_ns = PyLong_AsUnsignedLongLong(end);
    if (PyErr_Occurred())
        goto done;
    if (start_ns == 0 || end_ns == 0) {  /* a zero time is left out: encode_span's way */
        Py_CLEAR(parts);
        rc = put_fallback(out, fallback, span);
        goto done;
    }
    /* ids, parent id, name+kind, times, tail */
    unsigned char ids[2 + 16 + 2 + 8 + 2 + 8];
    Py_ssize_t ids_len = 0;
    ids[ids_len++] = 0x0A;
    ids[ids_len++] = 0x10;
    if (uint_be(PyTuple_GET_ITEM(ctx, 0), ids + ids_len, 16) < 0)
        goto done;
    ids_len += 16;
    ids[ids_len++] = 0x12;
    ids[ids_len++] = 0x08;
    if (uint_be(PyTuple_GET_ITEM(ctx, 1), ids + ids_len, 8) < 0)
        goto done;
    ids_len += 8;
    if (parent != Py_None) {
        ids[ids_len++] = 0x22;
        ids[ids_len++] = 0x08;
        if (uint_be(PyTuple_GET_ITEM(parent, 1), ids + ids_len, 8) < 0)
            goto done;
        ids_len += 8;
    }
    unsigned char times[18];
    times[0] = 0x39;
    le64(times + 1, start_ns);
    times[9] = 0x41;
    le64(times + 10, end_ns);
    PyObject *name_kind = PyTuple_GET_ITEM(parts, 0), *tail = PyTuple_GET_ITEM(parts, 1);
    Py_ssize_t body = ids_len + PyBytes_GET_SIZE(name_kind) + 18 + PyBytes_GET_SIZE(tail);
    unsigned char head[11];
    head[0] = 0x12;
    Py_ssize_t head_len = 1 + varint(head + 1, (uint64_t)body);
    if (buf_reserve(out, head_len + body) < 0)
        goto done;
    buf_put(out, head, head_len);
    buf_put(out, ids, ids_len);
    buf_put(out, PyBytes_AS_STRING(name_kind), PyBytes_GET_SIZE(name_kind));
    buf_put(out, times, 18);
    buf_put(out, PyBytes_AS_STRING(tail), PyBytes_GET_SIZE(tail));
    rc = 0;
done:
    Py_XDECREF(ctx);
    Py_XDECREF(parent);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_XDECREF(parts);
    return rc;
}

static PyObject *
encode_server_spans(PyObject *self, PyObject *args)
{
    PyObject *spans, *cache, *make_parts, *fallback;
    if (!PyArg_ParseTuple(args, "O!O!OO:encode_server_spans", &PyList_Type, &spans, &PyDict_Type, &cache, &make_parts,
                          &fallback))
        return NULL;
    Buf out = {NULL, 0, 0};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        Py_INCREF(span);
        int rc = encode_one(&out, span, cache, make_parts, fallback);
        Py_DECREF(span);
        if (rc < 0) {
            PyMem_Free(out.data);
            return NULL;
        }
    }
    PyObject *result = PyBytes_FromStringAndSize(out.data ? out.data : "", out.len);
    PyMem_Free(out.data);
    return result;
}

static PyObject *
common_recorder(PyObject *self, PyObject *spans)
{
    if (!PyList_Check(spans)) {
        PyErr_SetString(PyExc_TypeError, "spans must be a list");
        return NULL;
    }
    PyObject *recorder = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        const Layout *layout = layout_of(Py_TYPE(span));
        if (layout == NULL)
            Py_RETURN_NONE;
        PyObject *r = *(PyObject **)((char *)span + layout->offset[F_RECORDER]);
        if (r == NULL || (recorder != NULL && r != recorder))
            Py_RETURN_NONE;
        recorder = r;
    }
    if (recorder == NULL)
        Py_RETURN_NONE;
    Py_INCREF(recorder);
    return recorder;
}

/* new_span(type, recorder, name, context, parent, kind, attributes, status): what
 * ServerSpan.__init__ makes (no events or links, not ended, started now), its
 * slots set here; a type without a slot layout is called instead. */
static PyObject *
new_span(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "new_span(type, recorder, name, context, parent, kind, attributes, status)");
        return NULL;
    }
    PyTypeObject *tp = (PyTypeObject *)args[0];
    const Layout *layout = layout_of(tp);
    if (layout == NULL)
        return PyObject_Vectorcall(args[0], args + 1, 6, NULL);
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *start = PyLong_FromUnsignedLongLong((unsigned long long)ts.tv_sec * 1000000000ULL + ts.tv_nsec);
    if (start == NULL)
        return NULL;
    PyObject *span = tp->tp_alloc(tp, 0);
    if (span == NULL) {
        Py_DECREF(start);
        return NULL;
    }
#define SET(f, v) (*(PyObject **)((char *)span + layout->offset[f]) = Py_NewRef(v))
    SET(F_RECORDER, args[1]);
    SET(F_NAME, args[2]);
    SET(F_CONTEXT, args[3]);
    SET(F_PARENT, args[4]);
    SET(F_KIND, args[5]);
    SET(F_ATTRIBUTES, args[6]);
    SET(F_STATUS, args[7]);
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        Py_DECREF(start);
        Py_DECREF(span);
        return NULL;
    }
    SET(F_EVENTS, empty);
    SET(F_LINKS, empty);
    Py_DECREF(empty);
    SET(F_END, Py_None);
    *(PyObject **)((char *)span + layout->offset[F_START]) = start; /* the span owns it */
#undef SET
    return span;
}

static PyMethodDef methods[] = {
    {"new_span", (PyCFunction)(void (*)(void))new_span, METH_FASTCALL,
     "new_span(type, recorder, name, context, parent, kind, attributes, status) -> a ServerSpan started now"},
    {"common_recorder", common_recorder, METH_O,
     "common_recorder(spans: list) -> the `_recorder` every span holds when all are ServerSpans of one recorder, "
     "else None"},
    {"encode_server_spans", encode_server_spans, METH_VARARGS,
     "encode_server_spans(spans, cache, parts, fallback) -> bytes (see the module doc)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "services.common._otlp_fast", MODULE_DOC, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__otlp_fast(void)
{
#define INTERN(var, text)                              \
    if ((var = PyUnicode_InternFromString(text)) == NULL) \
        return NULL;
    INTERN(s_context, "_context");
    INTERN(s_parent, "_parent");
    INTERN(s_start_time, "_start_time");
    INTERN(s_end_time, "_end_time");
    INTERN(s_name, "_name");
    INTERN(s_kind, "_kind");
    INTERN(s_status, "_status");
    INTERN(s_attributes, "_attributes");
    INTERN(s_events, "_events");
    INTERN(s_status_code, "status_code");
    INTERN(s_description, "description");
    INTERN(s_recorder, "_recorder");
    INTERN(s_links, "_links");
#undef INTERN
    return PyModule_Create(&module_def);
}
