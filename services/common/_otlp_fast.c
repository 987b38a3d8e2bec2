/* OTLP wire bytes for runs of services.common.server_span.ServerSpans: what
 * services/common/otlp_encode.py's encode_server_span writes, span by span, without
 * the Python-level work per span (the template key, the id and time packing, the
 * concatenations). The template parts (a route's name, kind, attributes, status and
 * flags bytes) still come from Python (otlp_encode._server_parts) on a cache miss,
 * and any span outside the template's domain (events, links, a trace state, no end
 * time) is handed to Python's encoder: the two stay one definition, tested against
 * the SDK's encoder (tests/unit/test_server_span.py, tests/unit/test_otlp_encode.py).
 * A SpanSink's SpanBuffer writes every ServerSpan as it ends (encode_span_field: any
 * attributes and events, no template) and the gateway's RootSpans (encode_root_span),
 * tested byte for byte against the same encoder (tests/unit/test_span_sink.py,
 * tests/unit/test_request_span.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <errno.h>
#include <string.h>
#include <time.h>
#include <pthread.h>
#include <sys/random.h>

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
"entry; `fallback(span)` encodes a span the template does not cover (events, links,\n"
"a trace state, no end time, an unhashable attribute) and returns its field bytes.\n"
"\n"
"SpanBuffer: a SpanSink's queue of ended spans written as their bytes (add, take).\n"
"RootSpan, HttpSpans: the gateway's usual request span (request_span.http_spans).\n");

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
    PyObject *links = field(span, layout, F_LINKS);
    if (links == NULL)
        return -1;
    int has_links = PyObject_IsTrue(links);
    Py_DECREF(links);
    if (has_links != 0)
        return has_links < 0 ? -1 : 0;
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

/* An ended span already written as its Span field (tag 2 of ScopeSpans, with its
 * length), and the recorder (resource and scope) it belongs to: what HttpSpans
 * queues on a SpanSink in place of the span. Not tracked by the garbage collector
 * (it holds no container of its own: one object less for every collection to walk
 * while it waits in the queue); the bytes inline. */
typedef struct {
    PyObject_VAR_HEAD
    PyObject *recorder;
    Py_ssize_t spans; /* how many Span fields the bytes hold (SpanBuffer.take: a run) */
    char data[1];
} EncodedSpan;

static void
EncodedSpan_dealloc(EncodedSpan *self)
{
    Py_CLEAR(self->recorder);
    PyObject_Free(self);
}

static PyObject *
EncodedSpan_get_data(EncodedSpan *self, void *closure)
{
    return PyBytes_FromStringAndSize(self->data, Py_SIZE(self));
}

static PyGetSetDef EncodedSpan_getset[] = {
    {"data", (getter)EncodedSpan_get_data, NULL, "the Span field's bytes (tag, length, Span)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef EncodedSpan_members[] = {
    {"_recorder", T_OBJECT_EX, offsetof(EncodedSpan, recorder), READONLY, "the Recorder the span is of"},
    {"spans", T_PYSSIZET, offsetof(EncodedSpan, spans), READONLY, "how many spans the bytes hold"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject EncodedSpanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "services.common._otlp_fast.EncodedSpan",
    .tp_basicsize = offsetof(EncodedSpan, data),
    .tp_itemsize = 1,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Ended spans (one, or a run) as their OTLP Span fields' bytes, and their recorder.",
    .tp_dealloc = (destructor)EncodedSpan_dealloc,
    .tp_getset = EncodedSpan_getset,
    .tp_members = EncodedSpan_members,
};

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
    /* Room for the written spans' bytes at once (a batch is mostly one run of them). */
    Py_ssize_t written = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        if (Py_IS_TYPE(span, &EncodedSpanType))
            written += Py_SIZE(span);
    }
    if (written && buf_reserve(&out, written) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(spans); i++) {
        PyObject *span = PyList_GET_ITEM(spans, i);
        if (Py_IS_TYPE(span, &EncodedSpanType)) {
            if (buf_put(&out, ((EncodedSpan *)span)->data, Py_SIZE(span)) < 0) {
                PyMem_Free(out.data);
                return NULL;
            }
            continue;
        }
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
        PyObject *r;
        if (Py_IS_TYPE(span, &EncodedSpanType)) {
            r = ((EncodedSpan *)span)->recorder;
        } else {
            const Layout *layout = layout_of(Py_TYPE(span));
            if (layout == NULL)
                Py_RETURN_NONE;
            r = *(PyObject **)((char *)span + layout->offset[F_RECORDER]);
        }
        if (r == NULL || (recorder != NULL && r != recorder))
            Py_RETURN_NONE;
        recorder = r;
    }
    if (recorder == NULL)
        Py_RETURN_NONE;
    Py_INCREF(recorder);
    return recorder;
}

/* time.time_ns(): CLOCK_REALTIME in ns (it cannot fail with a valid clock id). */
static uint64_t
clock_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* A ServerSpan of type `tp` (slot layout `layout`) started now: what
 * ServerSpan.__init__ makes (no events or links, not ended); the arguments are
 * borrowed. */
static PyObject *
make_span(PyTypeObject *tp, const Layout *layout, PyObject *recorder, PyObject *name, PyObject *context,
          PyObject *parent, PyObject *kind, PyObject *attributes, PyObject *status)
{
    PyObject *start = PyLong_FromUnsignedLongLong((unsigned long long)clock_ns());
    if (start == NULL)
        return NULL;
    PyObject *span = tp->tp_alloc(tp, 0);
    if (span == NULL) {
        Py_DECREF(start);
        return NULL;
    }
    PyObject *empty = PyTuple_New(0);
    if (empty == NULL) {
        Py_DECREF(start);
        Py_DECREF(span);
        return NULL;
    }
#define SET(f, v) (*(PyObject **)((char *)span + layout->offset[f]) = Py_NewRef(v))
    SET(F_RECORDER, recorder);
    SET(F_NAME, name);
    SET(F_CONTEXT, context);
    SET(F_PARENT, parent);
    SET(F_KIND, kind);
    SET(F_ATTRIBUTES, attributes);
    SET(F_STATUS, status);
    SET(F_EVENTS, empty);
    SET(F_LINKS, empty);
    SET(F_END, Py_None);
#undef SET
    Py_DECREF(empty);
    *(PyObject **)((char *)span + layout->offset[F_START]) = start; /* the span owns it */
    return span;
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
    return make_span(tp, layout, args[1], args[2], args[3], args[4], args[5], args[6], args[7]);
}

/* An attribute value's AnyValue payload into `v` (at most 10 bytes) or, for a str,
 * its UTF-8 in *text; 1 written, 0 a type this does not write, -1 error. */
static int
any_value(PyObject *value, unsigned char *v, Py_ssize_t *vlen, const char **text, Py_ssize_t *tlen)
{
    *text = NULL;
    if (PyUnicode_CheckExact(value)) {
        *text = PyUnicode_AsUTF8AndSize(value, tlen);
        return *text == NULL ? -1 : 1;
    }
    if (PyBool_Check(value)) {
        v[0] = 0x10;
        v[1] = value == Py_True;
        *vlen = 2;
        return 1;
    }
    if (PyLong_CheckExact(value)) {
        int overflow;
        long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (n == -1 && PyErr_Occurred())
            return -1;
        if (overflow)
            return 0;
        v[0] = 0x18;
        *vlen = 1 + varint(v + 1, (uint64_t)n);
        return 1;
    }
    if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        v[0] = 0x21;
        le64(v + 1, bits);
        *vlen = 9;
        return 1;
    }
    return 0;
}

/* ---- SpanBuffer: ended spans, queued as their bytes ----
 *
 * A SpanSink's queue for the spans written when they end (HttpSpans' RootSpans, and
 * every ServerSpan through `add`): their Span fields back to back (no object per
 * span waiting for the exporter, nothing for the collector to walk), in one lane per
 * recorder (resource and scope), with where each span ends and when it came, so the
 * exporter takes a lane's oldest spans as one EncodedSpan: spans of recorders that
 * alternate (a request's client span, then its server span) still leave as a run per
 * recorder, not an object per span. The sink's list of span objects (`queue`) counts
 * toward the same bound; `wake` is called when the two together reach a batch, `drop`
 * for a span past the bound. Only the GIL holder touches it. */
typedef struct {
    PyObject *recorder;
    Buf buf;
    Py_ssize_t *ends; /* ends[i]: where span i's bytes end in buf */
    uint64_t *seqs;   /* seqs[i]: span i's arrival number (the buffer's counter) */
    Py_ssize_t count, cap;
} Lane;

typedef struct {
    PyObject_HEAD
    Lane **lanes;     /* one per recorder seen (a lane's address never moves) */
    Py_ssize_t nlanes, lanes_cap;
    Py_ssize_t count; /* spans in every lane */
    uint64_t seq;     /* the next arrival number */
    Py_ssize_t limit; /* the bound on spans here and in `queue`; 0 once shut down */
    Py_ssize_t batch; /* the export batch size */
    PyObject *queue;    /* the sink's list (exactly a list: its length read directly) */
    PyObject *wake;     /* called with no arguments, or None */
    PyObject *drop;
    PyObject *fallback; /* encodes a span `add` does not write (its Span field's bytes), or None */
} SpanBuffer;

static int
SpanBuffer_traverse(SpanBuffer *self, visitproc visit, void *arg)
{
    for (Py_ssize_t i = 0; i < self->nlanes; i++)
        Py_VISIT(self->lanes[i]->recorder);
    Py_VISIT(self->queue);
    Py_VISIT(self->wake);
    Py_VISIT(self->drop);
    Py_VISIT(self->fallback);
    return 0;
}

static void
span_buffer_empty(SpanBuffer *self)
{
    for (Py_ssize_t i = 0; i < self->nlanes; i++) {
        self->lanes[i]->buf.len = 0;
        self->lanes[i]->count = 0;
    }
    self->count = 0;
}

static int
SpanBuffer_clear_refs(SpanBuffer *self)
{
    span_buffer_empty(self);
    for (Py_ssize_t i = 0; i < self->nlanes; i++)
        Py_CLEAR(self->lanes[i]->recorder);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->drop);
    Py_CLEAR(self->fallback);
    return 0;
}

static void
SpanBuffer_dealloc(SpanBuffer *self)
{
    PyObject_GC_UnTrack(self);
    SpanBuffer_clear_refs(self);
    for (Py_ssize_t i = 0; i < self->nlanes; i++) {
        Lane *lane = self->lanes[i];
        PyMem_Free(lane->buf.data);
        PyMem_Free(lane->ends);
        PyMem_Free(lane->seqs);
        PyMem_Free(lane);
    }
    PyMem_Free(self->lanes);
    PyObject_GC_Del(self);
}

/* SpanBuffer(queue: list, wake (or None), drop, limit, batch) */
static PyObject *
SpanBuffer_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *queue, *wake, *drop;
    Py_ssize_t limit, batch;
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "SpanBuffer takes positional arguments");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "O!OOnn:SpanBuffer", &PyList_Type, &queue, &wake, &drop, &limit, &batch))
        return NULL;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "SpanBuffer: batch must be positive");
        return NULL;
    }
    SpanBuffer *self = PyObject_GC_New(SpanBuffer, type);
    if (self == NULL)
        return NULL;
    self->lanes = NULL;
    self->nlanes = self->lanes_cap = 0;
    self->count = 0;
    self->seq = 0;
    self->limit = limit;
    self->batch = batch;
    self->fallback = Py_NewRef(Py_None);
    self->queue = Py_NewRef(queue);
    self->wake = Py_NewRef(wake);
    self->drop = Py_NewRef(drop);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static Py_ssize_t
SpanBuffer_len(SpanBuffer *self)
{
    return self->count;
}

/* `recorder`'s lane (made on its first span); NULL with an error set on failure. */
static Lane *
span_buffer_lane(SpanBuffer *self, PyObject *recorder)
{
    for (Py_ssize_t i = 0; i < self->nlanes; i++)
        if (self->lanes[i]->recorder == recorder)
            return self->lanes[i];
    if (self->nlanes == self->lanes_cap) {
        Py_ssize_t cap = self->lanes_cap ? 2 * self->lanes_cap : 4;
        Lane **lanes = PyMem_Realloc(self->lanes, cap * sizeof(Lane *));
        if (lanes == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        self->lanes = lanes;
        self->lanes_cap = cap;
    }
    Lane *lane = PyMem_Calloc(1, sizeof(Lane));
    if (lane == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    lane->recorder = Py_NewRef(recorder);
    self->lanes[self->nlanes++] = lane;
    return lane;
}

/* The span whose bytes were just appended to `lane`'s buffer joins the queue; -1 (the
 * bytes taken back) when there is no memory to note it. Runs no Python code. */
static int
lane_written(SpanBuffer *self, Lane *lane, Py_ssize_t start)
{
    if (lane->count == lane->cap) {
        Py_ssize_t cap = lane->cap ? 2 * lane->cap : 512;
        Py_ssize_t *ends = PyMem_Realloc(lane->ends, cap * sizeof(Py_ssize_t));
        if (ends != NULL)
            lane->ends = ends;
        uint64_t *seqs = ends == NULL ? NULL : PyMem_Realloc(lane->seqs, cap * sizeof(uint64_t));
        if (seqs == NULL) {
            lane->buf.len = start;
            PyErr_NoMemory();
            return -1;
        }
        lane->seqs = seqs;
        lane->cap = cap;
    }
    lane->ends[lane->count] = lane->buf.len;
    lane->seqs[lane->count++] = self->seq++;
    self->count++;
    return 0;
}

/* take(n) -> an EncodedSpan holding the oldest lane's first min(n, its length) spans
 * (spans of one recorder, in the order they came), or None when empty. */
static PyObject *
SpanBuffer_take(SpanBuffer *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (self->count == 0 || n <= 0)
        Py_RETURN_NONE;
    Lane *lane = NULL;
    for (Py_ssize_t i = 0; i < self->nlanes; i++) {
        Lane *l = self->lanes[i];
        if (l->count && (lane == NULL || l->seqs[0] < lane->seqs[0]))
            lane = l;
    }
    if (n > lane->count)
        n = lane->count;
    Py_ssize_t size = lane->ends[n - 1];
    EncodedSpan *run = PyObject_NewVar(EncodedSpan, &EncodedSpanType, size);
    if (run == NULL)
        return NULL;
    memcpy(run->data, lane->buf.data, size);
    run->recorder = Py_NewRef(lane->recorder);
    run->spans = n;
    Py_ssize_t rest = lane->buf.len - size;
    memmove(lane->buf.data, lane->buf.data + size, rest);
    lane->buf.len = rest;
    for (Py_ssize_t i = n; i < lane->count; i++) {
        lane->ends[i - n] = lane->ends[i] - size;
        lane->seqs[i - n] = lane->seqs[i];
    }
    lane->count -= n;
    self->count -= n;
    return (PyObject *)run;
}

/* clear(): drop what is queued (a forked child's copy is its parent's to export). */
static PyObject *
SpanBuffer_clear(SpanBuffer *self, PyObject *unused)
{
    span_buffer_empty(self);
    Py_RETURN_NONE;
}

/* The queue's length, this buffer's spans and the list's. */
static Py_ssize_t
span_buffer_queued(SpanBuffer *self)
{
    return self->count + PyList_GET_SIZE(self->queue);
}

/* After a span joined the queue: wake the exporter when it made a batch (`wake`
 * None: no exporter yet). */
static int
span_buffer_joined(SpanBuffer *self)
{
    if (span_buffer_queued(self) != self->batch || self->wake == Py_None)
        return 0;
    PyObject *r = PyObject_CallNoArgs(self->wake);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

static PyObject *SpanBuffer_add(SpanBuffer *self, PyObject *span);
static PyObject *SpanBuffer_add_spans(SpanBuffer *self, PyObject *const *args, Py_ssize_t nargs);

static PyMethodDef SpanBuffer_methods[] = {
    {"take", (PyCFunction)SpanBuffer_take, METH_O,
     "take(n) -> an EncodedSpan run of the first min(n, len) spans of one recorder, or None when empty"},
    {"add", (PyCFunction)SpanBuffer_add, METH_O,
     "add(span): queue an ended sampled ServerSpan, written as its bytes (a Recorder's on_end)"},
    {"add_spans", (PyCFunction)(void (*)(void))SpanBuffer_add_spans, METH_FASTCALL,
     "add_spans(recorder, trace_id, parent_id, remote, kind, spans) -> bool: a tree of ended spans written from "
     "their fields (see the C source); False, nothing written, for a shape it leaves to span objects"},
    {"clear", (PyCFunction)SpanBuffer_clear, METH_NOARGS, "drop every span queued here"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SpanBuffer_members[] = {
    {"limit", T_PYSSIZET, offsetof(SpanBuffer, limit), 0, "the bound on spans here and in the queue list"},
    {"fallback", T_OBJECT_EX, offsetof(SpanBuffer, fallback), 0,
     "fallback(span) -> the Span field's bytes of a ServerSpan `add` does not write (None: queued as it is)"},
    {"wake", T_OBJECT_EX, offsetof(SpanBuffer, wake), 0, "called when the queue reaches a batch (None: nothing)"},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods SpanBuffer_as_sequence = {
    .sq_length = (lenfunc)SpanBuffer_len,
};

static PyTypeObject SpanBufferType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "services.common._otlp_fast.SpanBuffer",
    .tp_basicsize = sizeof(SpanBuffer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Ended spans queued for a SpanSink as their OTLP bytes (HttpSpans writes them).",
    .tp_new = SpanBuffer_new,
    .tp_traverse = (traverseproc)SpanBuffer_traverse,
    .tp_clear = (inquiry)SpanBuffer_clear_refs,
    .tp_dealloc = (destructor)SpanBuffer_dealloc,
    .tp_methods = SpanBuffer_methods,
    .tp_members = SpanBuffer_members,
    .tp_as_sequence = &SpanBuffer_as_sequence,
};

static Py_ssize_t
varint_len(uint64_t n)
{
    Py_ssize_t k = 1;
    while (n >= 0x80) {
        n >>= 7;
        k++;
    }
    return k;
}

static unsigned char *
put_varint(unsigned char *p, uint64_t n)
{
    return p + varint(p, n);
}

/* A length-delimited field's tag and length. */
static unsigned char *
put_head(unsigned char *p, unsigned char tag, Py_ssize_t n)
{
    *p++ = tag;
    return put_varint(p, (uint64_t)n);
}

static unsigned char *
put_fixed64(unsigned char *p, unsigned char tag, uint64_t v)
{
    *p++ = tag;
    le64(p, v);
    return p + 9 - 1;
}


/* ---- Any ServerSpan as its OTLP Span field, when it ends ----
 *
 * What otlp_encode.encode_span writes for a ServerSpan (every field, no template:
 * spans whose attributes differ request by request, as the inference engine's do,
 * never hit one), straight from the span's slots. Nested messages are written in
 * place behind a 5-byte length slot, closed to their varint length when done. A
 * span this does not write (a trace state, links, an attribute value of another
 * type, a non-dict attribute mapping) is left to the Python encoder. */

/* Open a length-delimited field `tag`; its start for ld_close. */
static Py_ssize_t
ld_open(Buf *b, unsigned char tag)
{
    if (buf_reserve(b, 6) < 0)
        return -1;
    b->data[b->len++] = (char)tag;
    Py_ssize_t at = b->len;
    b->len += 5;
    return at;
}

static void
ld_close(Buf *b, Py_ssize_t at)
{
    Py_ssize_t n = b->len - at - 5;
    unsigned char len[10];
    Py_ssize_t k = varint(len, (uint64_t)n);
    memmove(b->data + at + k, b->data + at + 5, n);
    memcpy(b->data + at, len, k);
    b->len -= 5 - k;
}

static int
put_bytes_field(Buf *b, unsigned char tag, const char *s, Py_ssize_t n)
{
    unsigned char head[11];
    head[0] = tag;
    Py_ssize_t h = 1 + varint(head + 1, (uint64_t)n);
    if (buf_reserve(b, h + n) < 0)
        return -1;
    buf_put(b, head, h);
    buf_put(b, s, n);
    return 0;
}

/* `_str(tag, s)`: nothing for an empty string. 1 written, 0 not a str, -1 error. */
static int
put_str_field(Buf *b, unsigned char tag, PyObject *s)
{
    if (!PyUnicode_Check(s))
        return 0;
    Py_ssize_t n;
    const char *text = PyUnicode_AsUTF8AndSize(s, &n);
    if (text == NULL)
        return -1;
    return n == 0 ? 1 : put_bytes_field(b, tag, text, n) < 0 ? -1 : 1;
}

static int put_attributes(Buf *b, unsigned char tag, PyObject *attributes, int depth);

/* An AnyValue's payload (otlp_encode._any_value): 1 written, 0 a value it does not
 * write (left to the Python encoder), -1 error. */
static int
put_any(Buf *b, PyObject *value, int depth)
{
    unsigned char v[12];
    if (value == Py_None)
        return 1;
    if (PyBool_Check(value)) {
        v[0] = 0x10;
        v[1] = value == Py_True;
        return buf_put(b, v, 2) < 0 ? -1 : 1;
    }
    if (PyUnicode_Check(value)) {
        Py_ssize_t n;
        const char *text = PyUnicode_AsUTF8AndSize(value, &n);
        if (text == NULL)
            return -1;
        return put_bytes_field(b, 0x0a, text, n) < 0 ? -1 : 1;
    }
    if (PyLong_Check(value)) {
        uint64_t n = PyLong_AsUnsignedLongLongMask(value);
        if (n == (uint64_t)-1 && PyErr_Occurred())
            return -1;
        v[0] = 0x18;
        return buf_put(b, v, 1 + varint(v + 1, n)) < 0 ? -1 : 1;
    }
    if (PyFloat_Check(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        v[0] = 0x21;
        le64(v + 1, bits);
        return buf_put(b, v, 9) < 0 ? -1 : 1;
    }
    if (PyBytes_Check(value))
        return put_bytes_field(b, 0x3a, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value)) < 0 ? -1 : 1;
    if (depth > 8)
        return 0;
    if (PyTuple_CheckExact(value) || PyList_CheckExact(value)) {
        Py_ssize_t arr = ld_open(b, 0x2a);
        if (arr < 0)
            return -1;
        for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(value); i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(value, i);
            Py_ssize_t at = ld_open(b, 0x0a);
            if (at < 0)
                return -1;
            Py_INCREF(item);
            int rc = put_any(b, item, depth + 1);
            Py_DECREF(item);
            if (rc <= 0)
                return rc;
            ld_close(b, at);
        }
        ld_close(b, arr);
        return 1;
    }
    if (PyDict_CheckExact(value)) {
        Py_ssize_t at = ld_open(b, 0x32);
        if (at < 0)
            return -1;
        int rc = put_attributes(b, 0x0a, value, depth + 1);
        if (rc <= 0)
            return rc;
        ld_close(b, at);
        return 1;
    }
    return 0;
}

/* Each item of the dict `attributes` as a KeyValue field `tag` (otlp_encode._attributes). */
static int
put_attributes(Buf *b, unsigned char tag, PyObject *attributes, int depth)
{
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &pos, &key, &value)) {
        Py_ssize_t at = ld_open(b, tag);
        if (at < 0)
            return -1;
        int rc = put_str_field(b, 0x0a, key);
        if (rc <= 0)
            return rc;
        Py_ssize_t any = ld_open(b, 0x12);
        if (any < 0)
            return -1;
        Py_INCREF(value);
        rc = put_any(b, value, depth);
        Py_DECREF(value);
        if (rc <= 0)
            return rc;
        ld_close(b, any);
        ld_close(b, at);
    }
    return 1;
}

/* An enum member's `.value` as a C long, cached by identity (SpanKind, StatusCode:
 * a handful of members). -1 with an error set on failure. */
static long
enum_value(PyObject *member)
{
    static PyObject *seen[16];
    static long values[16];
    static int n_seen;
    for (int i = 0; i < n_seen; i++)
        if (seen[i] == member)
            return values[i];
    PyObject *v = PyObject_GetAttrString(member, "value");
    if (v == NULL)
        return -1;
    long value = PyLong_AsLong(v);
    Py_DECREF(v);
    if (value == -1 && PyErr_Occurred())
        return -1;
    if (n_seen < 16) {
        seen[n_seen] = Py_NewRef(member);
        values[n_seen++] = value;
    }
    return value;
}

/* A Span's fields from its trace id to its end time (ids as their big-endian bytes;
 * `parent_id` NULL: none), as encode_span writes them: 1 written, 0 the name is not a
 * str (b may hold part of it), -1 error. */
static int
put_span_head(Buf *b, const unsigned char *trace_id, const unsigned char *span_id, const unsigned char *parent_id,
              PyObject *name, long kind, uint64_t t0, uint64_t t1)
{
    unsigned char head[2 + 16 + 2 + 8 + 2 + 8];
    Py_ssize_t n = 0;
    head[n++] = 0x0A;
    head[n++] = 0x10;
    memcpy(head + n, trace_id, 16);
    n += 16;
    head[n++] = 0x12;
    head[n++] = 0x08;
    memcpy(head + n, span_id, 8);
    n += 8;
    if (parent_id != NULL) {
        head[n++] = 0x22;
        head[n++] = 0x08;
        memcpy(head + n, parent_id, 8);
        n += 8;
    }
    if (buf_put(b, head, n) < 0)
        return -1;
    int ok = put_str_field(b, 0x2a, name);
    if (ok <= 0)
        return ok;
    unsigned char v[20];
    v[0] = 0x30;
    v[1] = (unsigned char)(kind + 1);
    n = 2;
    if (t0)
        n = put_fixed64(v + n, 0x39, t0) - v;
    if (t1)
        n = put_fixed64(v + n, 0x41, t1) - v;
    return buf_put(b, v, n) < 0 ? -1 : 1;
}

/* A Span's last fields: its status when `has_status` (the description when not NULL
 * or None, the code when set; empty for an unset one), then its flags (the parent is
 * remote or not). 1 written, 0 the description is not a str, -1 error. */
static int
put_span_tail(Buf *b, int has_status, PyObject *description, long code, int remote)
{
    if (has_status) {
        Py_ssize_t st = ld_open(b, 0x7a);
        if (st < 0)
            return -1;
        if (description != NULL && description != Py_None) {
            int ok = put_str_field(b, 0x12, description);
            if (ok <= 0)
                return ok;
        }
        if (code) {
            unsigned char v[11];
            v[0] = 0x18;
            if (buf_put(b, v, 1 + varint(v + 1, (uint64_t)code)) < 0)
                return -1;
        }
        ld_close(b, st);
    }
    static const unsigned char local[] = {0x85, 0x01, 0x00, 0x01, 0x00, 0x00};
    static const unsigned char from_remote[] = {0x85, 0x01, 0x00, 0x03, 0x00, 0x00};
    return buf_put(b, remote ? from_remote : local, 6) < 0 ? -1 : 1;
}

/* An Event's time (when not 0) and name, inside its open field: 1, 0 the name is not a
 * str, -1 error. */
static int
put_event_head(Buf *b, uint64_t ts, PyObject *name)
{
    if (ts) {
        unsigned char v[9];
        v[0] = 0x09;
        le64(v + 1, ts);
        if (buf_put(b, v, 9) < 0)
            return -1;
    }
    return put_str_field(b, 0x12, name);
}

/* One event (opentelemetry.sdk.trace.Event, read through its properties): 1, 0, -1. */
static int
put_event(Buf *b, PyObject *event)
{
    int rc = -1;
    PyObject *ts = NULL, *name = NULL, *attrs = NULL, *dropped = NULL;
    Py_ssize_t at = ld_open(b, 0x5a);
    if (at < 0 || (ts = PyObject_GetAttrString(event, "timestamp")) == NULL ||
        (name = PyObject_GetAttrString(event, "name")) == NULL ||
        (attrs = PyObject_GetAttrString(event, "attributes")) == NULL ||
        (dropped = PyObject_GetAttrString(event, "dropped_attributes")) == NULL)
        goto done;
    rc = 0;
    if (!PyLong_Check(ts) && ts != Py_None)
        goto done;
    uint64_t t = 0;
    if (ts != Py_None && (t = PyLong_AsUnsignedLongLongMask(ts)) == (uint64_t)-1 && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    if ((rc = put_event_head(b, t, name)) <= 0)
        goto done;
    if (attrs != Py_None) {
        if (!PyDict_CheckExact(attrs)) { /* BoundedAttributes and other mappings: the Python encoder */
            rc = 0;
            goto done;
        }
        if ((rc = put_attributes(b, 0x1a, attrs, 0)) <= 0)
            goto done;
    }
    long n_dropped = PyLong_AsLong(dropped);
    if (n_dropped == -1 && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    if (n_dropped) {
        unsigned char v[11];
        v[0] = 0x20;
        if (buf_put(b, v, 1 + varint(v + 1, (uint64_t)n_dropped)) < 0) {
            rc = -1;
            goto done;
        }
    }
    ld_close(b, at);
    rc = 1;
done:
    Py_XDECREF(ts);
    Py_XDECREF(name);
    Py_XDECREF(attrs);
    Py_XDECREF(dropped);
    return rc;
}

/* The ended ServerSpan `span` (whose type has `layout`) as its Span field (tag 2 of
 * ScopeSpans, with its length), appended to `b`: 1; 0 when it is one this does not
 * write (b as it was); -1 on error. */
static int
encode_span_field(Buf *b, PyObject *span, const Layout *layout)
{
    Py_ssize_t mark = b->len;
    int rc = -1;
    PyObject *ctx = NULL, *parent = NULL, *name = NULL, *kind = NULL, *start = NULL, *end = NULL, *attrs = NULL,
             *events = NULL, *links = NULL, *status = NULL, *code = NULL, *description = NULL;
    if ((ctx = field(span, layout, F_CONTEXT)) == NULL || (parent = field(span, layout, F_PARENT)) == NULL ||
        (name = field(span, layout, F_NAME)) == NULL || (kind = field(span, layout, F_KIND)) == NULL ||
        (start = field(span, layout, F_START)) == NULL || (end = field(span, layout, F_END)) == NULL ||
        (attrs = field(span, layout, F_ATTRIBUTES)) == NULL || (events = field(span, layout, F_EVENTS)) == NULL ||
        (links = field(span, layout, F_LINKS)) == NULL || (status = field(span, layout, F_STATUS)) == NULL)
        goto done;
    rc = 0;
    /* What the Python encoder is left: a trace state, links, an odd shape. */
    if (!PyTuple_Check(ctx) || PyTuple_GET_SIZE(ctx) < 5 || !PyLong_Check(start) || !PyLong_Check(end) ||
        (parent != Py_None && (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 3)) ||
        !PyDict_CheckExact(attrs) || !(PyTuple_CheckExact(events) || PyList_CheckExact(events)) ||
        !(PyTuple_CheckExact(links) || PyList_CheckExact(links)) || PySequence_Fast_GET_SIZE(links) != 0)
        goto done;
    int has_state = PyObject_IsTrue(PyTuple_GET_ITEM(ctx, 4));
    if (has_state != 0) {
        rc = has_state < 0 ? -1 : 0;
        goto done;
    }
    int remote = 0;
    if (parent != Py_None && (remote = PyObject_IsTrue(PyTuple_GET_ITEM(parent, 2))) < 0) {
        rc = -1;
        goto done;
    }
    long kind_value = enum_value(kind);
    if (kind_value == -1 && PyErr_Occurred()) {
        rc = -1;
        goto done;
    }
    rc = -1;
    long code_value = 0;
    if (status != Py_None) {
        if ((code = PyObject_GetAttr(status, s_status_code)) == NULL ||
            (description = PyObject_GetAttr(status, s_description)) == NULL)
            goto done;
        code_value = enum_value(code);
        if (code_value == -1 && PyErr_Occurred())
            goto done;
    }
    uint64_t t0 = PyLong_AsUnsignedLongLongMask(start), t1 = PyLong_AsUnsignedLongLongMask(end);
    if (PyErr_Occurred())
        goto done;
    unsigned char trace_id[16], span_id[8], parent_id[8];
    if (uint_be(PyTuple_GET_ITEM(ctx, 0), trace_id, 16) < 0 || uint_be(PyTuple_GET_ITEM(ctx, 1), span_id, 8) < 0 ||
        (parent != Py_None && uint_be(PyTuple_GET_ITEM(parent, 1), parent_id, 8) < 0))
        goto done;
    Py_ssize_t at = ld_open(b, 0x12);
    if (at < 0)
        goto done;
    int ok = put_span_head(b, trace_id, span_id, parent != Py_None ? parent_id : NULL, name, kind_value, t0, t1);
    if (ok <= 0) {
        rc = ok;
        goto done;
    }
    if ((ok = put_attributes(b, 0x4a, attrs, 0)) <= 0) {
        rc = ok;
        goto done;
    }
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(events); i++) {
        if ((ok = put_event(b, PySequence_Fast_GET_ITEM(events, i))) <= 0) {
            rc = ok;
            goto done;
        }
    }
    if ((ok = put_span_tail(b, status != Py_None, description, code_value, remote)) <= 0) {
        rc = ok;
        goto done;
    }
    ld_close(b, at);
    rc = 1;
done:
    if (rc <= 0)
        b->len = mark;
    Py_XDECREF(ctx);
    Py_XDECREF(parent);
    Py_XDECREF(name);
    Py_XDECREF(kind);
    Py_XDECREF(start);
    Py_XDECREF(end);
    Py_XDECREF(attrs);
    Py_XDECREF(events);
    Py_XDECREF(links);
    Py_XDECREF(status);
    Py_XDECREF(code);
    Py_XDECREF(description);
    return rc;
}

/* add(span): an ended sampled span onto the queue (a Recorder's on_end when its lone
 * processor is a SpanSink): a ServerSpan written as its bytes (by encode_span_field,
 * else by `fallback`), anything else onto the queue list as it is; dropped (and
 * counted by `drop`) past the bound.
 *
 * The span is written into a buffer of its own first: reading it can run Python code
 * (a Status' properties, an event's), where another thread may take the GIL and add
 * or take spans; the shared buffer is only touched after that, with no Python code
 * in between. */
static PyObject *
SpanBuffer_add(SpanBuffer *self, PyObject *span)
{
    if (span_buffer_queued(self) >= self->limit) /* the queue's bound; 0 once shut down */
        return PyObject_CallNoArgs(self->drop);
    const Layout *layout = layout_of(Py_TYPE(span));
    PyObject *recorder = layout != NULL ? *(PyObject **)((char *)span + layout->offset[F_RECORDER]) : NULL;
    if (recorder == NULL) {
        if (PyList_Append(self->queue, span) < 0)
            return NULL;
        if (span_buffer_joined(self) < 0)
            return NULL;
        Py_RETURN_NONE;
    }
    Py_INCREF(span);
    Py_INCREF(recorder);
    PyObject *result = NULL;
    Buf own = {NULL, 0, 0};
    int written = encode_span_field(&own, span, layout);
    if (written == 0 && self->fallback != Py_None)
        written = put_fallback(&own, self->fallback, span) < 0 ? -1 : 1;
    /* A span that cannot be written (a field of an odd type) must not fail the code
     * ending it: it waits as itself, and the exporter's encoder logs it. */
    if (written < 0 && !PyErr_ExceptionMatches(PyExc_MemoryError)) {
        PyErr_Clear();
        written = 0;
    }
    if (written < 0)
        goto done;
    if (span_buffer_queued(self) >= self->limit) { /* filled (or shut) meanwhile */
        result = PyObject_CallNoArgs(self->drop);
        goto done;
    }
    if (written == 0) {
        if (PyList_Append(self->queue, span) < 0)
            goto done;
    } else {
        Lane *lane = span_buffer_lane(self, recorder);
        if (lane == NULL)
            goto done;
        Py_ssize_t start = lane->buf.len;
        if (buf_put(&lane->buf, own.data, own.len) < 0 || lane_written(self, lane, start) < 0)
            goto done;
    }
    if (span_buffer_joined(self) < 0)
        goto done;
    result = Py_NewRef(Py_None);
done:
    PyMem_Free(own.data);
    Py_DECREF(recorder);
    Py_DECREF(span);
    return result;
}

static int is_zero(const unsigned char *p, size_t n);
static int draw_ids(unsigned char *out, size_t count, size_t width);

/* add_spans(recorder, trace_id, parent_id, remote, kind, spans) -> bool: a tree of
 * ended, sampled spans of `recorder` written straight from their fields, with no
 * span object (the inference engine's spans of one request, services/inference/
 * torch_engine/spans.py): each item of `spans` a tuple (name, parent, start, end,
 * attributes, events), `parent` the index in `spans` of its parent or -1 for
 * (`trace_id`, `parent_id`) (0: a root, of a trace drawn here; `remote`: that parent
 * came from another process), `events` a tuple of (name, timestamp) pairs, each span
 * of SpanKind value `kind`, status unset, a random span id of its own. The bytes are
 * what encode_span_field writes for the same ServerSpans. False, with nothing
 * written, when an item is not of that shape or an attribute value is one the
 * writer leaves to Python (the caller makes the spans as objects then); spans past
 * the queue's bound are dropped and counted, as `add` does. */
static PyObject *
SpanBuffer_add_spans(SpanBuffer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "add_spans takes 6 arguments");
        return NULL;
    }
    PyObject *recorder = args[0], *spans = args[5];
    if (!PyList_CheckExact(spans) && !PyTuple_CheckExact(spans)) {
        PyErr_SetString(PyExc_TypeError, "add_spans: spans must be a list or tuple");
        return NULL;
    }
    unsigned char trace_id[16], parent_id[8];
    if (uint_be(args[1], trace_id, 16) < 0 || uint_be(args[2], parent_id, 8) < 0)
        return NULL;
    int remote = PyObject_IsTrue(args[3]);
    long kind = PyLong_AsLong(args[4]);
    if (remote < 0 || (kind == -1 && PyErr_Occurred()))
        return NULL;
    if (kind < 0 || kind > 126) {
        PyErr_SetString(PyExc_ValueError, "add_spans: kind out of range");
        return NULL;
    }
    int has_parent = !is_zero(parent_id, 8), has_trace = !is_zero(trace_id, 16);
    if (has_parent && !has_trace) {
        PyErr_SetString(PyExc_ValueError, "add_spans: a parent span id needs its trace id");
        return NULL;
    }
    Py_INCREF(spans);
    Py_INCREF(recorder);
    Py_ssize_t n = PySequence_Fast_GET_SIZE(spans);
    PyObject *result = NULL;
    Buf own = {NULL, 0, 0};
    unsigned char *ids = PyMem_Malloc(8 * (size_t)(n ? n : 1));
    Py_ssize_t *ends = PyMem_Malloc(sizeof(Py_ssize_t) * (size_t)(n ? n : 1));
    if (ids == NULL || ends == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((!has_trace && draw_ids(trace_id, 1, 16) < 0) || draw_ids(ids, (size_t)n, 8) < 0)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(spans, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 6)
            goto unwritten;
        PyObject *name = PyTuple_GET_ITEM(item, 0), *start = PyTuple_GET_ITEM(item, 2),
                 *end = PyTuple_GET_ITEM(item, 3), *attrs = PyTuple_GET_ITEM(item, 4),
                 *events = PyTuple_GET_ITEM(item, 5);
        long parent = PyLong_Check(PyTuple_GET_ITEM(item, 1)) ? PyLong_AsLong(PyTuple_GET_ITEM(item, 1)) : -2;
        if (parent == -1 && PyErr_Occurred())
            goto done;
        if (parent < -1 || parent >= n || parent == i || !PyUnicode_Check(name) || !PyLong_Check(start) ||
            !PyLong_Check(end) || !PyDict_CheckExact(attrs) || !PyTuple_CheckExact(events))
            goto unwritten;
        uint64_t t0 = PyLong_AsUnsignedLongLongMask(start), t1 = PyLong_AsUnsignedLongLongMask(end);
        if (PyErr_Occurred())
            goto done;
        Py_ssize_t at = ld_open(&own, 0x12);
        if (at < 0)
            goto done;
        const unsigned char *parent_bytes = parent >= 0 ? ids + 8 * parent : has_parent ? parent_id : NULL;
        if (put_span_head(&own, trace_id, ids + 8 * i, parent_bytes, name, kind, t0, t1) < 0)
            goto done;
        int ok = put_attributes(&own, 0x4a, attrs, 0);
        if (ok < 0)
            goto done;
        if (ok == 0)
            goto unwritten;
        for (Py_ssize_t e = 0; e < PyTuple_GET_SIZE(events); e++) {
            PyObject *event = PyTuple_GET_ITEM(events, e);
            if (!PyTuple_CheckExact(event) || PyTuple_GET_SIZE(event) != 2 ||
                !PyUnicode_Check(PyTuple_GET_ITEM(event, 0)) || !PyLong_Check(PyTuple_GET_ITEM(event, 1)))
                goto unwritten;
            uint64_t ts = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(event, 1));
            if (PyErr_Occurred())
                goto done;
            Py_ssize_t ev = ld_open(&own, 0x5a);
            if (ev < 0 || put_event_head(&own, ts, PyTuple_GET_ITEM(event, 0)) < 0)
                goto done;
            ld_close(&own, ev);
        }
        if (put_span_tail(&own, 1, NULL, 0, parent == -1 && remote) < 0)
            goto done;
        ld_close(&own, at);
        ends[i] = own.len;
    }
    /* Written: onto the recorder's lane span by span (no Python code ran since the
     * first byte; `drop` and `wake` may run some, between spans). */
    Py_ssize_t from = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (span_buffer_queued(self) >= self->limit) {
            PyObject *r = PyObject_CallNoArgs(self->drop);
            if (r == NULL)
                goto done;
            Py_DECREF(r);
        } else {
            Lane *lane = span_buffer_lane(self, recorder);
            if (lane == NULL)
                goto done;
            Py_ssize_t mark = lane->buf.len;
            if (buf_put(&lane->buf, own.data + from, ends[i] - from) < 0 || lane_written(self, lane, mark) < 0)
                goto done;
            if (span_buffer_joined(self) < 0)
                goto done;
        }
        from = ends[i];
    }
    result = Py_NewRef(Py_True);
    goto done;
unwritten:
    result = Py_NewRef(Py_False);
done:
    PyMem_Free(own.data);
    PyMem_Free(ids);
    PyMem_Free(ends);
    Py_DECREF(recorder);
    Py_DECREF(spans);
    return result;
}

#define FAST_ATTRIBUTES 16

typedef struct {
    const char *key, *text;
    Py_ssize_t klen, tlen, vlen, any_len, kv_len;
    unsigned char v[12];
} AttrOut;

/* ---- The gateway's per-request server span (services.gateway.http.request_span) ----
 *
 * What request_span.begin_request / end_request do for the common request -- no
 * header the propagators read, nothing in the current context, a root the
 * recorder samples inline with random ids -- without a Python frame, and in one
 * object: a RootSpan is the span (an opentelemetry.trace.Span: made current in a
 * Context through the ContextVar behind opentelemetry.context, it parents gRPC
 * client spans, get_current_span() finds it) and stands in for the ASGI `send`,
 * keeping the response's status. What a ServerSpan keeps as objects it keeps as C
 * fields until asked: its ids as bytes (the SpanContext is made when someone asks
 * for it), its times as integers, its name and attributes as the request's method,
 * path and route (a dict once something reads or sets them). Its usual end is
 * written straight into the SpanSink's buffer as OTLP bytes. Its less usual
 * methods (attributes set, events, status, a new name) are ServerSpan's own
 * (services.common.server_span), run on it through the fields it shows under
 * ServerSpan's names: one definition of what they do. Any other request, and any
 * span whose end is not the plain success case, goes through the Python functions
 * given at build time (tests compare the two ways).
 */

typedef struct HttpSpans HttpSpans;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *send;     /* the ASGI send stood in for; NULL once the request ended */
    long status_code;   /* the response's status once started, else 0 */
    HttpSpans *spans;   /* what made it: recorder, kind, export */
    PyObject *method;   /* the request's method and path (str) */
    PyObject *path;
    PyObject *route;    /* the route, set by the usual end; then http.route and the status are attributes too */
    PyObject *name;     /* a name set (update_name), or NULL: "method path" ("method route" once ended) */
    PyObject *attributes; /* a dict once read or set, else NULL: the implied ones */
    PyObject *events;   /* ServerSpan's _events: () or a list */
    PyObject *status;   /* ServerSpan's _status: a Status */
    PyObject *context;  /* the SpanContext once asked for, else NULL */
    uint64_t start_ns, end_ns;
    int ended;
    unsigned char ids[24]; /* trace id, then span id: the big-endian bytes they are written as */
} RootSpan;

struct HttpSpans {
    PyObject_HEAD
    PyObject *recorder;        /* the Recorder (services.common.server_span) */
    PyObject *methods;         /* ServerSpan: its methods run on a RootSpan for the less usual calls */
    PyObject *var;             /* the ContextVar holding the current Context */
    PyObject *context_type;    /* opentelemetry.context.Context */
    PyObject *span_key;        /* the Context key of the current span */
    PyObject *span_context;    /* opentelemetry.trace.SpanContext */
    PyObject *flags;           /* a sampled root's TraceFlags */
    PyObject *trace_state;     /* DEFAULT_TRACE_STATE */
    PyObject *status;          /* Status(UNSET) */
    PyObject *kind;            /* SpanKind.SERVER */
    PyObject *on_end;          /* what takes an ended sampled span, or None */
    PyObject *propagate_dict;  /* opentelemetry.propagate's globals */
    PyObject *textmap;         /* the global textmap `fields` are of */
    PyObject *fields;          /* tuple of the header names (bytes, lower case) it reads */
    PyObject *telemetry_dict;  /* services.common.telemetry's globals */
    PyObject *tracer_name;     /* the recorder's key in telemetry._recorders */
    PyObject *begin_fallback;  /* request_span.begin_request */
    PyObject *end_fallback;    /* request_span.end_request */
    PyObject *finish;          /* request_span._finish */
    PyObject *detach_failed;   /* called with the exception when the context reset fails */
    PyObject *sink;            /* the SpanBuffer of the SpanSink whose add is on_end, or None */
    unsigned char kind_byte;   /* Span.kind's value for `kind` */
    unsigned char flags_byte;  /* `flags` as its byte */
};

static PyTypeObject HttpSpansType, RootSpanType;
static PyObject *empty_tuple;
static PyObject *s_type, *s_status_key, *s_response_start, *s_headers, *s_method, *s_path, *s_route, *s_path_attr,
    *s_method_attr, *s_url_path_attr, *s_route_attr, *s_status_attr, *s_textmap_global, *s_recorders_global,
    *s_resource, *s_scope;

/* Random span and trace ids: bytes from the kernel (getrandom), drawn a page at a
 * time (a syscall per ~170 requests); a forked child drops what is left of its
 * parent's page, so the two never share ids. Only the GIL holder draws. */
static unsigned char id_bytes[4096];
static size_t id_pos = sizeof(id_bytes);

static void
ids_after_fork(void)
{
    id_pos = sizeof(id_bytes);
}

static int
draw_id_bytes(unsigned char *out, size_t n)
{
    if (id_pos + n > sizeof(id_bytes)) {
        size_t got = 0;
        while (got < sizeof(id_bytes)) {
            ssize_t r = getrandom(id_bytes + got, sizeof(id_bytes) - got, 0);
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                PyErr_SetFromErrno(PyExc_OSError);
                return -1;
            }
            got += (size_t)r;
        }
        id_pos = 0;
    }
    memcpy(out, id_bytes + id_pos, n);
    id_pos += n;
    return 0;
}

/* Whether the n bytes at p are all 0 (an id no span may have). */
static int
is_zero(const unsigned char *p, size_t n)
{
    int zero = 1;
    for (size_t i = 0; i < n; i++)
        zero &= p[i] == 0;
    return zero;
}

/* `count` random ids of `width` bytes each, back to back at `out`, none 0. */
static int
draw_ids(unsigned char *out, size_t count, size_t width)
{
    if (count && draw_id_bytes(out, count * width) < 0)
        return -1;
    for (size_t i = 0; i < count; i++)
        if (is_zero(out + i * width, width))
            out[i * width + width - 1] = 1;
    return 0;
}

/* A root's random trace id and span id (16 and 8 big-endian bytes), neither 0. */
static int
root_ids(unsigned char ids[24])
{
    return draw_ids(ids, 1, 16) < 0 || draw_ids(ids + 16, 1, 8) < 0 ? -1 : 0;
}

/* "method path" (both str): the two copied into one new string when both are ASCII
 * (PyUnicode_FromFormat parses its format each time). */
static PyObject *
span_name(PyObject *method, PyObject *path)
{
    if (PyUnicode_Check(method) && PyUnicode_Check(path) && PyUnicode_IS_ASCII(method) && PyUnicode_IS_ASCII(path)) {
        Py_ssize_t lm = PyUnicode_GET_LENGTH(method), lp = PyUnicode_GET_LENGTH(path);
        PyObject *name = PyUnicode_New(lm + 1 + lp, 127);
        if (name == NULL)
            return NULL;
        Py_UCS1 *out = PyUnicode_1BYTE_DATA(name);
        memcpy(out, PyUnicode_1BYTE_DATA(method), lm);
        out[lm] = ' ';
        memcpy(out + lm + 1, PyUnicode_1BYTE_DATA(path), lp);
        return name;
    }
    return PyUnicode_FromFormat("%S %S", method, path);
}

/* ---- RootSpan ---- */

static PyObject *
RootSpan_vectorcall(PyObject *obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    RootSpan *self = (RootSpan *)obj;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "send(message) takes one message");
        return NULL;
    }
    PyObject *message = args[0];
    if (PyDict_Check(message)) {
        PyObject *type = PyDict_GetItemWithError(message, s_type);
        if (type == NULL && PyErr_Occurred())
            return NULL;
        if (type != NULL && PyUnicode_Check(type) && PyUnicode_Compare(type, s_response_start) == 0) {
            PyObject *status = PyDict_GetItemWithError(message, s_status_key);
            if (status == NULL && PyErr_Occurred())
                return NULL;
            if (status != NULL && PyLong_Check(status)) {
                long value = PyLong_AsLong(status);
                if (value == -1 && PyErr_Occurred())
                    return NULL;
                self->status_code = value;
            }
        }
    }
    if (self->send == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "send after the request's span ended");
        return NULL;
    }
    return PyObject_Vectorcall(self->send, args, 1, NULL);
}

static int
RootSpan_traverse(RootSpan *self, visitproc visit, void *arg)
{
    Py_VISIT(self->send);
    Py_VISIT((PyObject *)self->spans);
    Py_VISIT(self->method);
    Py_VISIT(self->path);
    Py_VISIT(self->route);
    Py_VISIT(self->name);
    Py_VISIT(self->attributes);
    Py_VISIT(self->events);
    Py_VISIT(self->status);
    Py_VISIT(self->context);
    return 0;
}

static int
RootSpan_clear(RootSpan *self)
{
    Py_CLEAR(self->send);
    Py_CLEAR(self->spans);
    Py_CLEAR(self->method);
    Py_CLEAR(self->path);
    Py_CLEAR(self->route);
    Py_CLEAR(self->name);
    Py_CLEAR(self->attributes);
    Py_CLEAR(self->events);
    Py_CLEAR(self->status);
    Py_CLEAR(self->context);
    return 0;
}

static void
RootSpan_dealloc(RootSpan *self)
{
    PyObject_GC_UnTrack(self);
    RootSpan_clear(self);
    PyObject_GC_Del(self);
}

/* Its SpanContext (a new reference), made the first time it is asked for. */
static PyObject *
root_context(RootSpan *self)
{
    if (self->context == NULL) {
        PyObject *trace_id = _PyLong_FromByteArray(self->ids, 16, 0, 0);
        PyObject *span_id = trace_id == NULL ? NULL : _PyLong_FromByteArray(self->ids + 16, 8, 0, 0);
        if (span_id == NULL) {
            Py_XDECREF(trace_id);
            return NULL;
        }
        PyTypeObject *sc_type = (PyTypeObject *)self->spans->span_context;
        PyObject *context = sc_type->tp_alloc(sc_type, 6);
        if (context == NULL) {
            Py_DECREF(trace_id);
            Py_DECREF(span_id);
            return NULL;
        }
        PyTuple_SET_ITEM(context, 0, trace_id);
        PyTuple_SET_ITEM(context, 1, span_id);
        PyTuple_SET_ITEM(context, 2, Py_NewRef(Py_False));
        PyTuple_SET_ITEM(context, 3, Py_NewRef(self->spans->flags));
        PyTuple_SET_ITEM(context, 4, Py_NewRef(self->spans->trace_state));
        PyTuple_SET_ITEM(context, 5, Py_NewRef(Py_True));
        /* Ints, flags and the shared default TraceState: in no cycle. */
        PyObject_GC_UnTrack(context);
        self->context = context;
    }
    return Py_NewRef(self->context);
}

/* The route its name and attributes use: the matched one once ended the usual way. */
static PyObject *
root_route(RootSpan *self)
{
    return self->route != NULL ? self->route : self->path;
}

static PyObject *
RootSpan_get_name(RootSpan *self, void *closure)
{
    if (self->name != NULL)
        return Py_NewRef(self->name);
    return span_name(self->method, root_route(self));
}

static int
RootSpan_set_name(RootSpan *self, PyObject *value, void *closure)
{
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "the name cannot be deleted");
        return -1;
    }
    Py_XSETREF(self->name, Py_NewRef(value));
    return 0;
}

/* Its attributes as the dict they are from now on (ServerSpan's methods set them
 * in it): the request's method and path, and once ended the usual way its route
 * and status. */
static PyObject *
RootSpan_get_attributes(RootSpan *self, void *closure)
{
    if (self->attributes == NULL) {
        PyObject *attributes = PyDict_New();
        if (attributes == NULL || PyDict_SetItem(attributes, s_method_attr, self->method) < 0 ||
            PyDict_SetItem(attributes, s_url_path_attr, self->path) < 0) {
            Py_XDECREF(attributes);
            return NULL;
        }
        if (self->route != NULL) {
            PyObject *code = PyLong_FromLong(self->status_code);
            if (code == NULL || PyDict_SetItem(attributes, s_route_attr, self->route) < 0 ||
                PyDict_SetItem(attributes, s_status_attr, code) < 0) {
                Py_XDECREF(code);
                Py_DECREF(attributes);
                return NULL;
            }
            Py_DECREF(code);
        }
        self->attributes = attributes;
    }
    return Py_NewRef(self->attributes);
}

static PyObject *
RootSpan_get_context(RootSpan *self, void *closure)
{
    return root_context(self);
}

static PyObject *
RootSpan_get_none(RootSpan *self, void *closure)
{
    Py_RETURN_NONE;
}

static PyObject *
RootSpan_get_start(RootSpan *self, void *closure)
{
    return PyLong_FromUnsignedLongLong((unsigned long long)self->start_ns);
}

static PyObject *
RootSpan_get_end(RootSpan *self, void *closure)
{
    if (!self->ended)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong((unsigned long long)self->end_ns);
}

static PyObject *
RootSpan_get_kind(RootSpan *self, void *closure)
{
    return Py_NewRef(self->spans->kind);
}

static PyObject *
RootSpan_get_links(RootSpan *self, void *closure)
{
    return Py_NewRef(empty_tuple);
}

static PyObject *
RootSpan_get_recorder(RootSpan *self, void *closure)
{
    return Py_NewRef(self->spans->recorder);
}

static PyObject *
RootSpan_get_resource(RootSpan *self, void *closure)
{
    return PyObject_GetAttr(self->spans->recorder, s_resource);
}

static PyObject *
RootSpan_get_scope(RootSpan *self, void *closure)
{
    return PyObject_GetAttr(self->spans->recorder, s_scope);
}

static PyObject *
RootSpan_get_status_code(RootSpan *self, void *closure)
{
    return PyLong_FromLong(self->status_code);
}

static PyGetSetDef RootSpan_getset[] = {
    {"_name", (getter)RootSpan_get_name, (setter)RootSpan_set_name, "the span's name", NULL},
    {"name", (getter)RootSpan_get_name, NULL, "the span's name", NULL},
    {"_attributes", (getter)RootSpan_get_attributes, NULL, "the span's attributes (a dict from now on)", NULL},
    {"attributes", (getter)RootSpan_get_attributes, NULL, "the span's attributes", NULL},
    {"_context", (getter)RootSpan_get_context, NULL, "its SpanContext", NULL},
    {"context", (getter)RootSpan_get_context, NULL, "its SpanContext", NULL},
    {"_parent", (getter)RootSpan_get_none, NULL, "None: a root", NULL},
    {"parent", (getter)RootSpan_get_none, NULL, "None: a root", NULL},
    {"_start_time", (getter)RootSpan_get_start, NULL, "start, ns since the epoch", NULL},
    {"_end_time", (getter)RootSpan_get_end, NULL, "end, ns since the epoch, or None while recording", NULL},
    {"_kind", (getter)RootSpan_get_kind, NULL, "SpanKind.SERVER", NULL},
    {"kind", (getter)RootSpan_get_kind, NULL, "SpanKind.SERVER", NULL},
    {"_links", (getter)RootSpan_get_links, NULL, "()", NULL},
    {"_recorder", (getter)RootSpan_get_recorder, NULL, "the Recorder it is of", NULL},
    {"resource", (getter)RootSpan_get_resource, NULL, "the recorder's resource", NULL},
    {"instrumentation_scope", (getter)RootSpan_get_scope, NULL, "the recorder's instrumentation scope", NULL},
    {"status_code", (getter)RootSpan_get_status_code, NULL, "the response's status once started, else 0", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef RootSpan_members[] = {
    {"_events", T_OBJECT_EX, offsetof(RootSpan, events), 0, "ServerSpan's _events: () or a list of Events"},
    {"_status", T_OBJECT_EX, offsetof(RootSpan, status), 0, "ServerSpan's _status"},
    {"status", T_OBJECT_EX, offsetof(RootSpan, status), READONLY, "the span's Status"},
    {NULL, 0, 0, 0, NULL},
};

static PyObject *
RootSpan_get_span_context(RootSpan *self, PyObject *unused)
{
    return root_context(self);
}

static PyObject *
RootSpan_is_recording(RootSpan *self, PyObject *unused)
{
    return PyBool_FromLong(!self->ended);
}

static int queue_root(HttpSpans *spans, SpanBuffer *buffer, RootSpan *span);

/* ServerSpan.end: the end time set once, the sampled span handed to the export
 * (written into the sink's buffer when it takes bytes). -1 on error. */
static int
root_end(RootSpan *self, uint64_t end_ns)
{
    if (self->ended)
        return 0;
    self->ended = 1;
    self->end_ns = end_ns;
    HttpSpans *spans = self->spans;
    if (spans->on_end == Py_None)
        return 0;
    if (Py_IS_TYPE(spans->sink, &SpanBufferType))
        return queue_root(spans, (SpanBuffer *)spans->sink, self);
    PyObject *r = PyObject_CallOneArg(spans->on_end, (PyObject *)self);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* end(end_time=None) */
static PyObject *
RootSpan_end(RootSpan *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *end_time = Py_None;
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs + nkw > 1 || (nkw && PyUnicode_CompareWithASCIIString(PyTuple_GET_ITEM(kwnames, 0), "end_time") != 0)) {
        PyErr_SetString(PyExc_TypeError, "end(end_time=None)");
        return NULL;
    }
    if (nargs + nkw == 1)
        end_time = args[0];
    uint64_t end_ns;
    if (end_time == Py_None) {
        end_ns = clock_ns();
    } else {
        end_ns = PyLong_AsUnsignedLongLong(end_time);
        if (end_ns == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    if (root_end(self, end_ns) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* The less usual Span methods: ServerSpan's, called with this span as `self`. */
enum { D_SET_ATTRIBUTES, D_SET_ATTRIBUTE, D_ADD_EVENT, D_ADD_LINK, D_UPDATE_NAME, D_SET_STATUS, D_RECORD_EXCEPTION,
       D_ENTER, D_EXIT, N_DELEGATES };
static const char *delegate_names[N_DELEGATES] = {"set_attributes", "set_attribute", "add_event", "add_link",
                                                  "update_name", "set_status", "record_exception", "__enter__",
                                                  "__exit__"};
static PyObject *delegate_strs[N_DELEGATES];

static PyObject *
root_delegate(PyObject *self, int which, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *fn = PyObject_GetAttr(((RootSpan *)self)->spans->methods, delegate_strs[which]);
    if (fn == NULL)
        return NULL;
    Py_ssize_t total = nargs + (kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames));
    PyObject *small[8], **all = small;
    if (total + 1 > 8 && (all = PyMem_Malloc((total + 1) * sizeof(PyObject *))) == NULL) {
        Py_DECREF(fn);
        return PyErr_NoMemory();
    }
    all[0] = self;
    for (Py_ssize_t i = 0; i < total; i++)
        all[i + 1] = args[i];
    PyObject *r = PyObject_Vectorcall(fn, all, nargs + 1, kwnames);
    if (all != small)
        PyMem_Free(all);
    Py_DECREF(fn);
    return r;
}

#define DELEGATE(fname, which)                                                                        \
    static PyObject *RootSpan_##fname(PyObject *self, PyObject *const *args, Py_ssize_t nargs,        \
                                      PyObject *kwnames)                                              \
    {                                                                                                 \
        return root_delegate(self, which, args, nargs, kwnames);                                      \
    }
DELEGATE(set_attributes, D_SET_ATTRIBUTES)
DELEGATE(set_attribute, D_SET_ATTRIBUTE)
DELEGATE(add_event, D_ADD_EVENT)
DELEGATE(add_link, D_ADD_LINK)
DELEGATE(update_name, D_UPDATE_NAME)
DELEGATE(set_status, D_SET_STATUS)
DELEGATE(record_exception, D_RECORD_EXCEPTION)
DELEGATE(enter, D_ENTER)
DELEGATE(exit, D_EXIT)
#undef DELEGATE

#define FASTKW (METH_FASTCALL | METH_KEYWORDS)
static PyMethodDef RootSpan_methods[] = {
    {"get_span_context", (PyCFunction)RootSpan_get_span_context, METH_NOARGS, "its SpanContext"},
    {"is_recording", (PyCFunction)RootSpan_is_recording, METH_NOARGS, "True until it ended"},
    {"end", (PyCFunction)(void (*)(void))RootSpan_end, FASTKW, "end(end_time=None): ServerSpan.end"},
    {"set_attributes", (PyCFunction)(void (*)(void))RootSpan_set_attributes, FASTKW, "ServerSpan.set_attributes"},
    {"set_attribute", (PyCFunction)(void (*)(void))RootSpan_set_attribute, FASTKW, "ServerSpan.set_attribute"},
    {"add_event", (PyCFunction)(void (*)(void))RootSpan_add_event, FASTKW, "ServerSpan.add_event"},
    {"add_link", (PyCFunction)(void (*)(void))RootSpan_add_link, FASTKW, "ServerSpan.add_link"},
    {"update_name", (PyCFunction)(void (*)(void))RootSpan_update_name, FASTKW, "ServerSpan.update_name"},
    {"set_status", (PyCFunction)(void (*)(void))RootSpan_set_status, FASTKW, "ServerSpan.set_status"},
    {"record_exception", (PyCFunction)(void (*)(void))RootSpan_record_exception, FASTKW,
     "ServerSpan.record_exception"},
    {"__enter__", (PyCFunction)(void (*)(void))RootSpan_enter, FASTKW, "Span.__enter__"},
    {"__exit__", (PyCFunction)(void (*)(void))RootSpan_exit, FASTKW, "Span.__exit__"},
    {NULL, NULL, 0, NULL},
};
#undef FASTKW

static PyObject *
RootSpan_repr(RootSpan *self)
{
    PyObject *name = RootSpan_get_name(self, NULL);
    PyObject *context = name == NULL ? NULL : root_context(self);
    PyObject *r = context == NULL ? NULL : PyUnicode_FromFormat("RootSpan(name=\"%U\", context=%R)", name, context);
    Py_XDECREF(name);
    Py_XDECREF(context);
    return r;
}

static PyTypeObject RootSpanType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "services.common._otlp_fast.RootSpan",
    .tp_basicsize = sizeof(RootSpan),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "A gateway request's sampled root server span, standing in for its ASGI send (HttpSpans.begin's).",
    .tp_vectorcall_offset = offsetof(RootSpan, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)RootSpan_traverse,
    .tp_clear = (inquiry)RootSpan_clear,
    .tp_dealloc = (destructor)RootSpan_dealloc,
    .tp_repr = (reprfunc)RootSpan_repr,
    .tp_methods = RootSpan_methods,
    .tp_members = RootSpan_members,
    .tp_getset = RootSpan_getset,
};

/* One attribute for the writer: its key's and value's bytes and sizes; 1 written,
 * 0 a key or value the writer leaves to Python, -1 error. */
static int
attr_out(AttrOut *a, PyObject *key, PyObject *value)
{
    if (!PyUnicode_CheckExact(key))
        return 0;
    a->key = PyUnicode_AsUTF8AndSize(key, &a->klen);
    if (a->key == NULL)
        return -1;
    a->tlen = a->vlen = 0;
    int ok = any_value(value, a->v, &a->vlen, &a->text, &a->tlen);
    if (ok <= 0)
        return ok;
    a->any_len = a->text != NULL ? 1 + varint_len((uint64_t)a->tlen) + a->tlen : a->vlen;
    a->kv_len = (a->klen ? 1 + varint_len((uint64_t)a->klen) + a->klen : 0) + 1 + varint_len((uint64_t)a->any_len) +
                a->any_len;
    return 1;
}

/* The ended `span` as its Span field, what otlp_encode.encode_server_span writes for
 * it, when it is the usual one (no events, its status unset, up to FAST_ATTRIBUTES
 * scalar attributes), appended to `out` (its exact size reserved first, then
 * written in place): 1; 0 when it is not (nothing written); -1 on error. */
static int
encode_root_span(HttpSpans *spans, RootSpan *span, Buf *out)
{
    PyObject *events = span->events;
    if (span->status != spans->status || !span->ended ||
        !((PyTuple_CheckExact(events) && PyTuple_GET_SIZE(events) == 0) ||
          (PyList_CheckExact(events) && PyList_GET_SIZE(events) == 0)))
        return 0;
    /* The name: one set, or "method route" written from the two. */
    const char *name_text = NULL, *method_text = NULL, *route_text = NULL;
    Py_ssize_t name_len = 0, method_len = 0, route_len = 0;
    if (span->name != NULL) {
        if (!PyUnicode_CheckExact(span->name))
            return 0;
        if ((name_text = PyUnicode_AsUTF8AndSize(span->name, &name_len)) == NULL)
            return -1;
    } else {
        PyObject *route = root_route(span);
        if (!PyUnicode_CheckExact(span->method) || !PyUnicode_CheckExact(route))
            return 0;
        if ((method_text = PyUnicode_AsUTF8AndSize(span->method, &method_len)) == NULL ||
            (route_text = PyUnicode_AsUTF8AndSize(route, &route_len)) == NULL)
            return -1;
        name_len = method_len + 1 + route_len;
    }
    uint64_t t0 = span->start_ns, t1 = span->end_ns;
    /* The body's size: ids, name, kind, times, attributes, status and flags. */
    Py_ssize_t body = 2 + 16 + 2 + 8 + 2 + (t0 ? 9 : 0) + (t1 ? 9 : 0) + 8;
    if (name_len)
        body += 1 + varint_len((uint64_t)name_len) + name_len;
    AttrOut attrs[FAST_ATTRIBUTES];
    Py_ssize_t n_attrs = 0;
    PyObject *code = NULL;
    int ok = 1;
    if (span->attributes == NULL) { /* the implied ones */
        PyObject *keys[4] = {s_method_attr, s_url_path_attr, s_route_attr, s_status_attr};
        PyObject *values[4] = {span->method, span->path, span->route, NULL};
        Py_ssize_t n = span->route != NULL ? 4 : 2;
        if (n == 4 && (code = values[3] = PyLong_FromLong(span->status_code)) == NULL)
            return -1;
        for (Py_ssize_t i = 0; i < n && ok > 0; i++)
            ok = attr_out(&attrs[n_attrs++], keys[i], values[i]);
    } else {
        if (!PyDict_CheckExact(span->attributes) || PyDict_GET_SIZE(span->attributes) > FAST_ATTRIBUTES)
            return 0;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (ok > 0 && PyDict_Next(span->attributes, &pos, &key, &value))
            ok = attr_out(&attrs[n_attrs++], key, value);
    }
    if (ok <= 0) {
        Py_XDECREF(code);
        return ok;
    }
    for (Py_ssize_t i = 0; i < n_attrs; i++)
        body += 1 + varint_len((uint64_t)attrs[i].kv_len) + attrs[i].kv_len;
    Py_ssize_t field = 1 + varint_len((uint64_t)body) + body;
    if (buf_reserve(out, field) < 0) {
        Py_XDECREF(code);
        return -1;
    }
    unsigned char *p = (unsigned char *)out->data + out->len, *first = p;
    p = put_head(p, 0x12, body);
    p = put_head(p, 0x0a, 16);
    memcpy(p, span->ids, 16);
    p = put_head(p + 16, 0x12, 8);
    memcpy(p, span->ids + 16, 8);
    p += 8;
    if (name_len) {
        p = put_head(p, 0x2a, name_len);
        if (name_text != NULL) {
            memcpy(p, name_text, name_len);
        } else {
            memcpy(p, method_text, method_len);
            p[method_len] = ' ';
            memcpy(p + method_len + 1, route_text, route_len);
        }
        p += name_len;
    }
    *p++ = 0x30;
    *p++ = spans->kind_byte;
    if (t0)
        p = put_fixed64(p, 0x39, t0);
    if (t1)
        p = put_fixed64(p, 0x41, t1);
    for (Py_ssize_t i = 0; i < n_attrs; i++) {
        AttrOut *a = &attrs[i];
        p = put_head(p, 0x4a, a->kv_len);
        if (a->klen) {
            p = put_head(p, 0x0a, a->klen);
            memcpy(p, a->key, a->klen);
            p += a->klen;
        }
        p = put_head(p, 0x12, a->any_len);
        if (a->text != NULL) {
            p = put_head(p, 0x0a, a->tlen);
            memcpy(p, a->text, a->tlen);
            p += a->tlen;
        } else {
            memcpy(p, a->v, a->vlen);
            p += a->vlen;
        }
    }
    Py_XDECREF(code); /* a small int: its bytes were written into attrs[3].v */
    /* Status (unset), then SpanFlags: a local root. */
    static const unsigned char tail[] = {0x7a, 0x00, 0x85, 0x01, 0x00, 0x01, 0x00, 0x00};
    memcpy(p, tail, sizeof(tail));
    p += sizeof(tail);
    if (p - first != field) {
        PyErr_SetString(PyExc_SystemError, "encode_root_span: size mismatch");
        return -1;
    }
    out->len += field;
    return 1;
}

/* The ended `span` onto the sink's queue: written into `buffer` when it is the usual
 * one (encode_root_span), else as it is onto the queue list; dropped (and counted by
 * `drop`) past the bound. -1 on error. */
static int
queue_root(HttpSpans *spans, SpanBuffer *buffer, RootSpan *span)
{
    if (span_buffer_queued(buffer) >= buffer->limit) { /* the queue's bound; 0 once shut down */
        PyObject *r = PyObject_CallNoArgs(buffer->drop);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    Lane *lane = span_buffer_lane(buffer, spans->recorder);
    if (lane == NULL)
        return -1;
    Py_ssize_t start = lane->buf.len;
    int written = encode_root_span(spans, span, &lane->buf);
    if (written < 0)
        return -1;
    if (written) {
        if (lane_written(buffer, lane, start) < 0)
            return -1;
    } else if (PyList_Append(buffer->queue, (PyObject *)span) < 0) {
        return -1;
    }
    return span_buffer_joined(buffer);
}

/* ---- HttpSpans ---- */

#define HTTP_SPANS_NOBJ 21

static PyObject **
http_spans_objects(HttpSpans *self, int i)
{
    PyObject **all[HTTP_SPANS_NOBJ] = {
        &self->recorder,       &self->methods,        &self->var,            &self->context_type, &self->span_key,
        &self->span_context,   &self->flags,          &self->trace_state,    &self->status,       &self->kind,
        &self->on_end,         &self->propagate_dict, &self->textmap,        &self->fields,       &self->telemetry_dict,
        &self->tracer_name,    &self->begin_fallback, &self->end_fallback,   &self->finish,       &self->detach_failed,
        &self->sink,
    };
    return all[i];
}

static int
HttpSpans_traverse(HttpSpans *self, visitproc visit, void *arg)
{
    for (int i = 0; i < HTTP_SPANS_NOBJ; i++)
        Py_VISIT(*http_spans_objects(self, i));
    return 0;
}

static int
HttpSpans_clear(HttpSpans *self)
{
    for (int i = 0; i < HTTP_SPANS_NOBJ; i++)
        Py_CLEAR(*http_spans_objects(self, i));
    return 0;
}

static void
HttpSpans_dealloc(HttpSpans *self)
{
    PyObject_GC_UnTrack(self);
    HttpSpans_clear(self);
    PyObject_GC_Del(self);
}

/* A small int attribute of `obj` (its `value` when `attr`), in [lo, hi]; -1 on error. */
static long
small_int(PyObject *obj, const char *attr, long lo, long hi, const char *what)
{
    PyObject *value = attr != NULL ? PyObject_GetAttrString(obj, attr) : Py_NewRef(obj);
    long n = value == NULL ? -1 : PyLong_AsLong(value);
    Py_XDECREF(value);
    if (n < lo || n > hi) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "HttpSpans: %s out of range", what);
        return -1;
    }
    return n;
}

/* HttpSpans(recorder, methods, var, context_type, span_key, span_context, flags,
 *           trace_state, status, kind, on_end, propagate_dict, textmap,
 *           fields, telemetry_dict, tracer_name, begin_fallback, end_fallback, finish,
 *           detach_failed, sink) */
static PyObject *
HttpSpans_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "HttpSpans takes positional arguments");
        return NULL;
    }
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != HTTP_SPANS_NOBJ) {
        PyErr_Format(PyExc_TypeError, "HttpSpans takes %d arguments", HTTP_SPANS_NOBJ);
        return NULL;
    }
    if (!PyContextVar_CheckExact(PyTuple_GET_ITEM(args, 2)) || !PyType_Check(PyTuple_GET_ITEM(args, 3)) ||
        !PyType_Check(PyTuple_GET_ITEM(args, 5)) || !PyTuple_Check(PyTuple_GET_ITEM(args, 13)) ||
        !PyDict_Check(PyTuple_GET_ITEM(args, 11)) || !PyDict_Check(PyTuple_GET_ITEM(args, 14))) {
        PyErr_SetString(PyExc_TypeError, "HttpSpans: var must be a ContextVar, context_type and span_context types, "
                                         "fields a tuple, propagate_dict and telemetry_dict dicts");
        return NULL;
    }
    PyTypeObject *span_context = (PyTypeObject *)PyTuple_GET_ITEM(args, 5);
    if (!PyType_IsSubtype(span_context, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)PyTuple_GET_ITEM(args, 3), &PyDict_Type)) {
        PyErr_SetString(PyExc_TypeError, "HttpSpans: span_context must be a tuple type, context_type a dict type");
        return NULL;
    }
    long kind = small_int(PyTuple_GET_ITEM(args, 9), "value", 0, 126, "kind");
    long flags = kind < 0 ? -1 : small_int(PyTuple_GET_ITEM(args, 6), NULL, 0, 255, "flags");
    if (flags < 0)
        return NULL;
    if (!(flags & 1)) {
        PyErr_SetString(PyExc_ValueError, "HttpSpans: the roots' flags must be sampled");
        return NULL;
    }
    HttpSpans *self = PyObject_GC_New(HttpSpans, type);
    if (self == NULL)
        return NULL;
    for (int i = 0; i < HTTP_SPANS_NOBJ; i++)
        *http_spans_objects(self, i) = Py_NewRef(PyTuple_GET_ITEM(args, i));
    self->kind_byte = (unsigned char)(kind + 1);
    self->flags_byte = (unsigned char)flags;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* 1 when the request takes the short way, 0 when it needs begin_request, -1 on error. */
static int
http_begin_applies(HttpSpans *self, PyObject *scope)
{
    PyObject *recorders = PyDict_GetItemWithError(self->telemetry_dict, s_recorders_global);
    if (recorders == NULL || !PyDict_Check(recorders))
        return PyErr_Occurred() ? -1 : 0;
    PyObject *recorder = PyDict_GetItemWithError(recorders, self->tracer_name);
    if (recorder != self->recorder)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *textmap = PyDict_GetItemWithError(self->propagate_dict, s_textmap_global);
    if (textmap != self->textmap)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *headers = PyDict_GetItemWithError(scope, s_headers);
    if (headers == NULL)
        return PyErr_Occurred() ? -1 : 1;
    if (!PyList_Check(headers) && !PyTuple_Check(headers))
        return 0;
    Py_ssize_t nfields = PyTuple_GET_SIZE(self->fields);
    PyObject **items = PySequence_Fast_ITEMS(headers);
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(headers); i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) < 1)
            return 0;
        PyObject *key = PyTuple_GET_ITEM(pair, 0);
        if (!PyBytes_Check(key))
            return 0;
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        for (Py_ssize_t f = 0; f < nfields; f++) {
            PyObject *field = PyTuple_GET_ITEM(self->fields, f);
            if (PyBytes_GET_SIZE(field) == len && memcmp(PyBytes_AS_STRING(field), PyBytes_AS_STRING(key), len) == 0)
                return 0; /* the caller's context: extracted by begin_request */
        }
    }
    return 1;
}

/* begin(scope, send) -> (span, send, token): begin_request's result; on the short
 * way the span is a RootSpan and its own send. */
static PyObject *
HttpSpans_begin(HttpSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin(scope, send)");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    int applies = PyDict_Check(scope) ? http_begin_applies(self, scope) : 0;
    if (applies < 0)
        return NULL;
    PyObject *base = NULL;
    if (applies) {
        if (PyContextVar_Get(self->var, NULL, &base) < 0)
            return NULL;
        /* A current context with anything in it (a span, baggage): begin_request. */
        applies = base != NULL && PyDict_Check(base) && PyDict_GET_SIZE(base) == 0;
        Py_XDECREF(base);
    }
    PyObject *method = NULL, *path = NULL;
    if (applies) {
        method = PyDict_GetItemWithError(scope, s_method);
        path = method == NULL ? NULL : PyDict_GetItemWithError(scope, s_path);
        if (PyErr_Occurred())
            return NULL;
        applies = method != NULL && path != NULL && PyUnicode_CheckExact(method) && PyUnicode_CheckExact(path);
    }
    if (!applies)
        return PyObject_Vectorcall(self->begin_fallback, args, 2, NULL);

    RootSpan *span = PyObject_GC_New(RootSpan, &RootSpanType);
    if (span == NULL)
        return NULL;
    span->vectorcall = RootSpan_vectorcall;
    span->send = Py_NewRef(send);
    span->status_code = 0;
    span->spans = (HttpSpans *)Py_NewRef((PyObject *)self);
    span->method = Py_NewRef(method);
    span->path = Py_NewRef(path);
    span->route = span->name = span->attributes = span->context = NULL;
    span->events = Py_NewRef(empty_tuple);
    span->status = Py_NewRef(self->status);
    span->ended = 0;
    span->end_ns = 0;
    span->start_ns = clock_ns();
    PyObject_GC_Track(span);
    PyObject *result = NULL, *ctx = NULL, *token = NULL;
    if (root_ids(span->ids) < 0)
        goto done;
    PyTypeObject *ctx_type = (PyTypeObject *)self->context_type;
    if ((ctx = ctx_type->tp_new(ctx_type, empty_tuple, NULL)) == NULL ||
        PyDict_SetItem(ctx, self->span_key, (PyObject *)span) < 0)
        goto done;
    /* The Context holds the span alone, which refers to nothing that holds it back. */
    PyObject_GC_UnTrack(ctx);
    if ((token = PyContextVar_Set(self->var, ctx)) == NULL)
        goto done;
    result = PyTuple_Pack(3, (PyObject *)span, (PyObject *)span, token);
    if (result == NULL) /* the context stays as it was */
        PyContextVar_Reset(self->var, token);
done:
    Py_DECREF(span);
    Py_XDECREF(ctx);
    Py_XDECREF(token);
    return result;
}

/* end(span, send, scope, token, error): end_request's work; None. */
static PyObject *
HttpSpans_end(HttpSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "end(span, send, scope, token, error)");
        return NULL;
    }
    PyObject *scope = args[2], *token = args[3], *error = args[4];
    if (!Py_IS_TYPE(args[0], &RootSpanType) || !PyDict_Check(scope)) {
        PyObject *fallback_args[4] = {args[0], scope, token, error};
        return PyObject_Vectorcall(self->end_fallback, fallback_args, 4, NULL);
    }
    RootSpan *span = (RootSpan *)args[0];
    if (PyContextVar_Reset(self->var, token) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) && !PyErr_ExceptionMatches(PyExc_RuntimeError))
            return NULL;
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL)
            PyException_SetTraceback(value, tb);
        PyObject *logged = PyObject_CallOneArg(self->detach_failed, value);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (logged == NULL)
            return NULL;
        Py_DECREF(logged);
    }
    long status = span->status_code;
    /* An ended span waits in the export queue: it must not keep the request's
     * objects alive (see end_request). */
    Py_CLEAR(span->send);
    if (span->ended)
        Py_RETURN_NONE;
    if (error != Py_None || status >= 500 || status == 0) {
        PyObject *code = PyLong_FromLong(status);
        if (code == NULL)
            return NULL;
        PyObject *finish_args[4] = {(PyObject *)span, scope, code, error};
        PyObject *r = PyObject_Vectorcall(self->finish, finish_args, 4, NULL);
        Py_DECREF(code);
        return r;
    }
    /* _finish's success case: the route template the router matched, else the path. */
    PyObject *path = PyDict_GetItemWithError(scope, s_path);
    if (path == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "path");
        return NULL;
    }
    Py_INCREF(path);
    PyObject *route = NULL;
    PyObject *matched = PyDict_GetItemWithError(scope, s_route);
    if (matched == NULL && PyErr_Occurred())
        goto fail;
    if (matched != NULL && matched != Py_None) {
        if (_PyObject_LookupAttr(matched, s_path_attr, &route) < 0)
            goto fail;
        if (route != NULL) {
            int truth = PyObject_IsTrue(route);
            if (truth < 0)
                goto fail;
            if (!truth)
                Py_CLEAR(route);
        }
    }
    if (route == NULL)
        route = Py_NewRef(path);
    if (route != path) {
        int same = PyUnicode_Check(route) && PyUnicode_Check(path) ? PyUnicode_Compare(route, path) : -1;
        if (same == -1 && PyErr_Occurred())
            goto fail;
        if (same != 0) /* named by its route (a name set earlier gives way, as in end_request) */
            Py_CLEAR(span->name);
    }
    if (span->attributes != NULL) {
        PyObject *code = PyLong_FromLong(status);
        if (code == NULL || PyDict_SetItem(span->attributes, s_route_attr, route) < 0 ||
            PyDict_SetItem(span->attributes, s_status_attr, code) < 0) {
            Py_XDECREF(code);
            goto fail;
        }
        Py_DECREF(code);
    }
    Py_XSETREF(span->route, route);
    Py_DECREF(path);
    if (root_end(span, clock_ns()) < 0)
        return NULL;
    Py_RETURN_NONE;
fail:
    Py_XDECREF(route);
    Py_XDECREF(path);
    return NULL;
}

static PyMethodDef HttpSpans_methods[] = {
    {"begin", (PyCFunction)(void (*)(void))HttpSpans_begin, METH_FASTCALL,
     "begin(scope, send) -> (span, send, token): request_span.begin_request's"},
    {"end", (PyCFunction)(void (*)(void))HttpSpans_end, METH_FASTCALL,
     "end(span, send, scope, token, error): request_span.end_request's"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef HttpSpans_members[] = {
    {"recorder", T_OBJECT_EX, offsetof(HttpSpans, recorder), READONLY, "the Recorder its spans are of"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject HttpSpansType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "services.common._otlp_fast.HttpSpans",
    .tp_basicsize = sizeof(HttpSpans),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The gateway's request server spans opened and closed in C (see request_span.http_spans).",
    .tp_new = HttpSpans_new,
    .tp_traverse = (traverseproc)HttpSpans_traverse,
    .tp_clear = (inquiry)HttpSpans_clear,
    .tp_dealloc = (destructor)HttpSpans_dealloc,
    .tp_methods = HttpSpans_methods,
    .tp_members = HttpSpans_members,
};

/* current_link(var, span_key, general): what trajectory.tracing.submission_span
 * returns, for the current Context in `var`: a RootSpan's as its 25 bytes (trace
 * id, span id, flags), None with no current span, `general(span)` for any other
 * span. */
static PyObject *
current_link(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyContextVar_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "current_link(var: ContextVar, span_key, general)");
        return NULL;
    }
    PyObject *ctx = NULL;
    if (PyContextVar_Get(args[0], NULL, &ctx) < 0)
        return NULL;
    if (ctx == NULL)
        Py_RETURN_NONE;
    if (!PyDict_Check(ctx)) { /* opentelemetry.context.Context is a dict */
        Py_DECREF(ctx);
        PyErr_SetString(PyExc_TypeError, "current_link: the current context is not a dict");
        return NULL;
    }
    PyObject *span = PyDict_GetItemWithError(ctx, args[1]);
    PyObject *result;
    if (span == NULL) {
        result = PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    } else if (Py_IS_TYPE(span, &RootSpanType)) {
        RootSpan *root = (RootSpan *)span;
        unsigned char bytes[25];
        memcpy(bytes, root->ids, 24);
        bytes[24] = root->spans->flags_byte;
        result = PyBytes_FromStringAndSize((const char *)bytes, 25);
    } else {
        result = PyObject_CallOneArg(args[2], span);
    }
    Py_DECREF(ctx);
    return result;
}


/* The value of a hex digit (lower case only, as W3C trace context writes them), or -1. */
static int
hex_digit(Py_UCS1 c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* `n` hex digits at `p` into big-endian bytes at `out`; -1 on a character that is not one. */
static int
hex_bytes(const Py_UCS1 *p, Py_ssize_t n, unsigned char *out)
{
    for (Py_ssize_t i = 0; i < n; i += 2) {
        int hi = hex_digit(p[i]), lo = hex_digit(p[i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        out[i / 2] = (unsigned char)(hi << 4 | lo);
    }
    return 0;
}

/* carried_traceparent(metadata, fields) -> None | (trace_id, span_id, flags) | False:
 * what server_rpc_span reads from a gRPC call's metadata (a sequence of (key, value)
 * pairs) under the default propagators, whose header names are `fields` (a set of
 * str): None when no entry is one of them; the ids and flags of a lone well-formed
 * version-00 `traceparent` (non-zero ids, lower-case hex, as telemetry.remote_parent
 * takes it); False for anything else (another field, a second traceparent, bytes,
 * another form: propagate.extract's to read). */
static PyObject *
carried_traceparent(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyAnySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "carried_traceparent(metadata, fields: set)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "carried_traceparent: metadata must be a sequence");
    if (seq == NULL)
        return NULL;
    PyObject *found = NULL, *result = NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = items[i];
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2)
            goto general;
        PyObject *key = PyTuple_GET_ITEM(pair, 0);
        int contained = PySet_Contains(args[1], key);
        if (contained < 0)
            goto done;
        if (!contained)
            continue;
        if (found != NULL || !PyUnicode_Check(key) || PyUnicode_CompareWithASCIIString(key, "traceparent") != 0)
            goto general;
        found = PyTuple_GET_ITEM(pair, 1);
    }
    if (found == NULL) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    /* 00-<32 hex>-<16 hex>-<2 hex> */
    if (!PyUnicode_Check(found) || !PyUnicode_IS_ASCII(found) || PyUnicode_GET_LENGTH(found) != 55)
        goto general;
    const Py_UCS1 *t = PyUnicode_1BYTE_DATA(found);
    unsigned char ids[24], flags;
    if (t[0] != '0' || t[1] != '0' || t[2] != '-' || t[35] != '-' || t[52] != '-' || hex_bytes(t + 3, 32, ids) < 0 ||
        hex_bytes(t + 36, 16, ids + 16) < 0 || hex_bytes(t + 53, 2, &flags) < 0 || is_zero(ids, 16) ||
        is_zero(ids + 16, 8))
        goto general;
    PyObject *trace_id = _PyLong_FromByteArray(ids, 16, 0, 0);
    PyObject *span_id = trace_id == NULL ? NULL : _PyLong_FromByteArray(ids + 16, 8, 0, 0);
    PyObject *flag_value = span_id == NULL ? NULL : PyLong_FromLong(flags);
    if (flag_value != NULL)
        result = PyTuple_Pack(3, trace_id, span_id, flag_value);
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_XDECREF(flag_value);
    goto done;
general:
    result = Py_NewRef(Py_False);
done:
    Py_DECREF(seq);
    return result;
}


static PyMethodDef methods[] = {
    {"new_span", (PyCFunction)(void (*)(void))new_span, METH_FASTCALL,
     "new_span(type, recorder, name, context, parent, kind, attributes, status) -> a ServerSpan started now"},
    {"common_recorder", common_recorder, METH_O,
     "common_recorder(spans: list) -> the `_recorder` every span holds when all are ServerSpans of one recorder, "
     "else None"},
    {"encode_server_spans", encode_server_spans, METH_VARARGS,
     "encode_server_spans(spans, cache, parts, fallback) -> bytes (see the module doc)"},
    {"carried_traceparent", (PyCFunction)(void (*)(void))carried_traceparent, METH_FASTCALL,
     "carried_traceparent(metadata, fields) -> None | (trace_id, span_id, flags) | False (server_rpc_span)"},
    {"current_link", (PyCFunction)(void (*)(void))current_link, METH_FASTCALL,
     "current_link(var, span_key, general) -> the current span's link (trajectory.tracing.submission_span)"},
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
    INTERN(s_type, "type");
    INTERN(s_status_key, "status");
    INTERN(s_response_start, "http.response.start");
    INTERN(s_headers, "headers");
    INTERN(s_method, "method");
    INTERN(s_path, "path");
    INTERN(s_route, "route");
    INTERN(s_path_attr, "path");
    INTERN(s_method_attr, "http.request.method");
    INTERN(s_url_path_attr, "url.path");
    INTERN(s_route_attr, "http.route");
    INTERN(s_status_attr, "http.response.status_code");
    INTERN(s_textmap_global, "_HTTP_TEXT_FORMAT");
    INTERN(s_recorders_global, "_recorders");
    INTERN(s_resource, "resource");
    INTERN(s_scope, "scope");
    for (int i = 0; i < N_DELEGATES; i++)
        INTERN(delegate_strs[i], delegate_names[i]);
#undef INTERN
    if ((empty_tuple = PyTuple_New(0)) == NULL)
        return NULL;
    if (pthread_atfork(NULL, NULL, ids_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    if (PyType_Ready(&RootSpanType) < 0 || PyType_Ready(&HttpSpansType) < 0 || PyType_Ready(&EncodedSpanType) < 0 ||
        PyType_Ready(&SpanBufferType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "RootSpan", (PyObject *)&RootSpanType) < 0 ||
        PyModule_AddObjectRef(module, "HttpSpans", (PyObject *)&HttpSpansType) < 0 ||
        PyModule_AddObjectRef(module, "EncodedSpan", (PyObject *)&EncodedSpanType) < 0 ||
        PyModule_AddObjectRef(module, "SpanBuffer", (PyObject *)&SpanBufferType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
