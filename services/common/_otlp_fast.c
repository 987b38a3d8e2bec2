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

/* time.time_ns() as an int (a new reference; NULL with an error set). */
static PyObject *
now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromUnsignedLongLong((unsigned long long)ts.tv_sec * 1000000000ULL + ts.tv_nsec);
}

/* A ServerSpan of type `tp` (slot layout `layout`) started now: what
 * ServerSpan.__init__ makes (no events or links, not ended); the arguments are
 * borrowed. */
static PyObject *
make_span(PyTypeObject *tp, const Layout *layout, PyObject *recorder, PyObject *name, PyObject *context,
          PyObject *parent, PyObject *kind, PyObject *attributes, PyObject *status)
{
    PyObject *start = now_ns();
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

/* ---- The gateway's per-request server span (services.gateway.http.request_span) ----
 *
 * What request_span.begin_request / end_request do for the common request -- no
 * header the propagators read, nothing in the current context, a root the
 * recorder samples inline with random ids -- without a Python frame: the span,
 * its SpanContext, the Context made current (the ContextVar behind
 * opentelemetry.context), and a StatusSend standing in for the ASGI `send` that
 * keeps the response's status. Any other request, and any span whose end is not
 * the plain success case, goes through the Python functions given at build time
 * (one definition of the semantics; tests compare the two).
 */

typedef struct {
    PyObject_HEAD
    PyObject *send; /* the ASGI send stood in for; NULL once the request ended */
    long status;    /* the response's status once started, else 0 */
    vectorcallfunc vectorcall;
    /* The span's SpanContext as begin made it, and its ids as the bytes they are
     * written as (trace id, then span id, big-endian): the encoder writes them
     * without reading the ints back while the span still holds this context. */
    PyObject *context;
    unsigned char ids[24];
} StatusSend;

static PyObject *s_type, *s_status_key, *s_response_start, *s_headers, *s_method, *s_path, *s_route, *s_path_attr,
    *s_method_attr, *s_url_path_attr, *s_route_attr, *s_status_attr, *s_textmap_global, *s_recorders_global;

static PyObject *
StatusSend_vectorcall(PyObject *obj, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    StatusSend *self = (StatusSend *)obj;
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
                self->status = value;
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
StatusSend_traverse(StatusSend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->send);
    Py_VISIT(self->context);
    return 0;
}

static int
StatusSend_clear(StatusSend *self)
{
    Py_CLEAR(self->send);
    Py_CLEAR(self->context);
    return 0;
}

static void
StatusSend_dealloc(StatusSend *self)
{
    PyObject_GC_UnTrack(self);
    StatusSend_clear(self);
    PyObject_GC_Del(self);
}

static PyObject *
StatusSend_get_status(StatusSend *self, void *closure)
{
    return PyLong_FromLong(self->status);
}

static PyGetSetDef StatusSend_getset[] = {
    {"status_code", (getter)StatusSend_get_status, NULL, "the response's status once started, else 0", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StatusSendType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "services.common._otlp_fast.StatusSend",
    .tp_basicsize = sizeof(StatusSend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "An ASGI send that keeps the response's status (HttpSpans.begin's).",
    .tp_vectorcall_offset = offsetof(StatusSend, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)StatusSend_traverse,
    .tp_clear = (inquiry)StatusSend_clear,
    .tp_dealloc = (destructor)StatusSend_dealloc,
    .tp_getset = StatusSend_getset,
};

typedef struct {
    PyObject_HEAD
    PyObject *recorder;        /* the Recorder (services.common.server_span) */
    PyObject *span_type;       /* HttpServerSpan */
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
    const Layout *layout;
    unsigned char kind_byte; /* Span.kind's value for `kind` */
} HttpSpans;

static PyTypeObject HttpSpansType;

#define HTTP_SPANS_NOBJ 21

static PyObject **
http_spans_objects(HttpSpans *self, int i)
{
    PyObject **all[HTTP_SPANS_NOBJ] = {
        &self->recorder,       &self->span_type,      &self->var,            &self->context_type, &self->span_key,
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

/* HttpSpans(recorder, span_type, var, context_type, span_key, span_context, flags,
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
    PyObject *span_type = PyTuple_GET_ITEM(args, 1);
    if (!PyType_Check(span_type) || (layout_of((PyTypeObject *)span_type)) == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "span_type must be a ServerSpan type with slots");
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
    HttpSpans *self = PyObject_GC_New(HttpSpans, type);
    if (self == NULL)
        return NULL;
    for (int i = 0; i < HTTP_SPANS_NOBJ; i++)
        *http_spans_objects(self, i) = Py_NewRef(PyTuple_GET_ITEM(args, i));
    self->layout = layout_of((PyTypeObject *)span_type);
    PyObject_GC_Track(self);
    PyObject *value = PyObject_GetAttrString(self->kind, "value");
    long kind = value == NULL ? -1 : PyLong_AsLong(value);
    Py_XDECREF(value);
    if (kind < 0 || kind > 126) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "HttpSpans: kind must be a SpanKind");
        Py_DECREF(self);
        return NULL;
    }
    self->kind_byte = (unsigned char)(kind + 1);
    return (PyObject *)self;
}

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

/* A root's random span id and trace id as ints, never 0 (as server_span.Recorder's,
 * drawn in that order), and in `be` the bytes they are written as (trace id, span
 * id; big-endian). -1 on error. */
static int
root_ids(PyObject **span_id, PyObject **trace_id, unsigned char be[24])
{
    unsigned char raw[24];
    if (draw_id_bytes(raw, 24) < 0)
        return -1;
    int span_zero = 1, trace_zero = 1;
    for (int i = 0; i < 8; i++)
        span_zero &= raw[i] == 0;
    for (int i = 8; i < 24; i++)
        trace_zero &= raw[i] == 0;
    if (span_zero)
        raw[0] = 1; /* never 0 */
    if (trace_zero)
        raw[8] = 1;
    uint64_t v;
    memcpy(&v, raw, 8);
    for (int i = 0; i < 8; i++)
        be[16 + i] = (unsigned char)(v >> (56 - 8 * i));
    for (int i = 0; i < 16; i++)
        be[i] = raw[23 - i]; /* the int is read little-endian from raw[8:24] */
    *span_id = PyLong_FromUnsignedLongLong((unsigned long long)v);
    if (*span_id == NULL)
        return -1;
    *trace_id = _PyLong_FromByteArray(raw + 8, 16, 1, 0);
    if (*trace_id == NULL) {
        Py_CLEAR(*span_id);
        return -1;
    }
    return 0;
}

/* "method path" (both str): the two copied into one new string when both are ASCII
 * (PyUnicode_FromFormat parses its format each time: a third of begin's work). */
static PyObject *
span_name(PyObject *method, PyObject *path)
{
    if (PyUnicode_IS_ASCII(method) && PyUnicode_IS_ASCII(path)) {
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
    return PyUnicode_FromFormat("%U %U", method, path);
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

/* begin(scope, send) -> (span, send, token): begin_request's result. */
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
        applies = method != NULL && path != NULL && PyUnicode_Check(method) && PyUnicode_Check(path);
    }
    if (!applies)
        return PyObject_Vectorcall(self->begin_fallback, args, 2, NULL);

    PyObject *result = NULL, *trace_id = NULL, *span_id = NULL, *context = NULL, *attributes = NULL, *name = NULL,
             *span = NULL, *ctx = NULL, *token = NULL, *empty = NULL;
    StatusSend *status_send = NULL;
    unsigned char be_ids[24];
    if (root_ids(&span_id, &trace_id, be_ids) < 0)
        goto done;
    PyTypeObject *sc_type = (PyTypeObject *)self->span_context;
    if ((context = sc_type->tp_alloc(sc_type, 6)) == NULL)
        goto done;
    PyTuple_SET_ITEM(context, 0, Py_NewRef(trace_id));
    PyTuple_SET_ITEM(context, 1, Py_NewRef(span_id));
    PyTuple_SET_ITEM(context, 2, Py_NewRef(Py_False));
    PyTuple_SET_ITEM(context, 3, Py_NewRef(self->flags));
    PyTuple_SET_ITEM(context, 4, Py_NewRef(self->trace_state));
    PyTuple_SET_ITEM(context, 5, Py_NewRef(Py_True));
    /* Ints, flags and the shared default TraceState: it can be in no cycle, so the
     * collector need not walk it. */
    PyObject_GC_UnTrack(context);
    if ((attributes = PyDict_New()) == NULL || PyDict_SetItem(attributes, s_method_attr, method) < 0 ||
        PyDict_SetItem(attributes, s_url_path_attr, path) < 0)
        goto done;
    if ((name = span_name(method, path)) == NULL)
        goto done;
    if ((span = make_span((PyTypeObject *)self->span_type, self->layout, self->recorder, name, context, Py_None,
                          self->kind, attributes, self->status)) == NULL)
        goto done;
    PyTypeObject *ctx_type = (PyTypeObject *)self->context_type;
    if ((empty = PyTuple_New(0)) == NULL || (ctx = ctx_type->tp_new(ctx_type, empty, NULL)) == NULL ||
        PyDict_SetItem(ctx, self->span_key, span) < 0)
        goto done;
    /* The Context holds the span alone, which refers to nothing that holds it back. */
    PyObject_GC_UnTrack(ctx);
    if ((status_send = PyObject_GC_New(StatusSend, &StatusSendType)) == NULL)
        goto done;
    status_send->send = Py_NewRef(send);
    status_send->status = 0;
    status_send->vectorcall = StatusSend_vectorcall;
    status_send->context = Py_NewRef(context);
    memcpy(status_send->ids, be_ids, 24);
    PyObject_GC_Track(status_send);
    if ((token = PyContextVar_Set(self->var, ctx)) == NULL)
        goto done;
    result = PyTuple_Pack(3, span, (PyObject *)status_send, token);
    if (result == NULL) /* the context stays as it was */
        PyContextVar_Reset(self->var, token);
done:
    Py_XDECREF(trace_id);
    Py_XDECREF(span_id);
    Py_XDECREF(context);
    Py_XDECREF(attributes);
    Py_XDECREF(name);
    Py_XDECREF(span);
    Py_XDECREF(empty);
    Py_XDECREF(ctx);
    Py_XDECREF(token);
    Py_XDECREF(status_send);
    return result;
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

/* ---- SpanBuffer: the gateway's ended request spans, queued as their bytes ----
 *
 * A SpanSink's queue for the spans HttpSpans writes when they end: their Span fields
 * back to back in one buffer (no object per span, nothing for the collector), with
 * where each ends, so the exporter takes a batch of them as one EncodedSpan run. The
 * sink's list of span objects (`queue`) counts toward the same bound; `wake` is
 * called when the two together reach a batch, `drop` for a span past the bound.
 * Only the GIL holder touches it. */
typedef struct {
    PyObject_HEAD
    Buf buf;
    Py_ssize_t *ends; /* ends[i]: where span i's bytes end in buf */
    Py_ssize_t count, ends_cap;
    Py_ssize_t limit; /* the bound on spans here and in `queue`; 0 once shut down */
    Py_ssize_t batch; /* the export batch size */
    PyObject *recorder; /* the spans' recorder (the first writer's), or NULL while empty */
    PyObject *queue;    /* the sink's list (exactly a list: its length read directly) */
    PyObject *wake;     /* called with no arguments, or None */
    PyObject *drop;
} SpanBuffer;

static int
SpanBuffer_traverse(SpanBuffer *self, visitproc visit, void *arg)
{
    Py_VISIT(self->recorder);
    Py_VISIT(self->queue);
    Py_VISIT(self->wake);
    Py_VISIT(self->drop);
    return 0;
}

static int
SpanBuffer_clear_refs(SpanBuffer *self)
{
    Py_CLEAR(self->recorder);
    Py_CLEAR(self->queue);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->drop);
    return 0;
}

static void
SpanBuffer_dealloc(SpanBuffer *self)
{
    PyObject_GC_UnTrack(self);
    SpanBuffer_clear_refs(self);
    PyMem_Free(self->buf.data);
    PyMem_Free(self->ends);
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
    self->buf = (Buf){NULL, 0, 0};
    self->ends = NULL;
    self->count = self->ends_cap = 0;
    self->limit = limit;
    self->batch = batch;
    self->recorder = NULL;
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

static void
span_buffer_empty(SpanBuffer *self)
{
    self->buf.len = 0;
    self->count = 0;
    Py_CLEAR(self->recorder);
}

/* take(n) -> an EncodedSpan holding the first min(n, len) spans (in the order they
 * came), or None when empty. */
static PyObject *
SpanBuffer_take(SpanBuffer *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n > self->count)
        n = self->count;
    if (n <= 0)
        Py_RETURN_NONE;
    Py_ssize_t size = self->ends[n - 1];
    EncodedSpan *run = PyObject_NewVar(EncodedSpan, &EncodedSpanType, size);
    if (run == NULL)
        return NULL;
    memcpy(run->data, self->buf.data, size);
    run->recorder = Py_NewRef(self->recorder);
    run->spans = n;
    if (n == self->count) {
        span_buffer_empty(self);
    } else {
        Py_ssize_t rest = self->buf.len - size;
        memmove(self->buf.data, self->buf.data + size, rest);
        self->buf.len = rest;
        for (Py_ssize_t i = n; i < self->count; i++)
            self->ends[i - n] = self->ends[i] - size;
        self->count -= n;
    }
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

static PyMethodDef SpanBuffer_methods[] = {
    {"take", (PyCFunction)SpanBuffer_take, METH_O,
     "take(n) -> an EncodedSpan run of the first min(n, len) spans, or None when empty"},
    {"clear", (PyCFunction)SpanBuffer_clear, METH_NOARGS, "drop every span queued here"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SpanBuffer_members[] = {
    {"limit", T_PYSSIZET, offsetof(SpanBuffer, limit), 0, "the bound on spans here and in the queue list"},
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

#define FAST_ATTRIBUTES 16

typedef struct {
    const char *key, *text;
    Py_ssize_t klen, tlen, vlen, any_len, kv_len;
    unsigned char v[12];
} AttrOut;

/* The ended `span` as its Span field, what otlp_encode.encode_server_span writes for
 * it, when it is the usual server span (a root, no events, links or trace state, its
 * status unset, up to FAST_ATTRIBUTES scalar attributes), appended to `out` (its
 * exact size reserved first, then written in place): 1; 0 when it is not the usual
 * span (nothing written); -1 on error. `ids` are the bytes of the span's ids when
 * `status_send` made its context (see StatusSend), else read from the ints. */
static int
encode_http_span(HttpSpans *self, PyObject *span, StatusSend *status_send, Buf *out)
{
    const Layout *layout = self->layout;
#define SLOT(f) (*(PyObject **)((char *)span + layout->offset[f]))
    PyObject *ctx = SLOT(F_CONTEXT), *events = SLOT(F_EVENTS), *links = SLOT(F_LINKS), *name = SLOT(F_NAME),
             *attributes = SLOT(F_ATTRIBUTES), *start = SLOT(F_START), *end = SLOT(F_END);
    if (ctx == NULL || !PyTuple_Check(ctx) || PyTuple_GET_SIZE(ctx) < 6 || PyTuple_GET_ITEM(ctx, 4) != self->trace_state ||
        SLOT(F_PARENT) != Py_None || SLOT(F_STATUS) != self->status || SLOT(F_KIND) != self->kind ||
        events == NULL || PyObject_Length(events) != 0 || links == NULL || PyObject_Length(links) != 0 ||
        name == NULL || !PyUnicode_CheckExact(name) || attributes == NULL || !PyDict_CheckExact(attributes) ||
        PyDict_GET_SIZE(attributes) > FAST_ATTRIBUTES || start == NULL || !PyLong_CheckExact(start) || end == NULL ||
        !PyLong_CheckExact(end)) {
        if (PyErr_Occurred())
            return -1;
        return 0;
    }
#undef SLOT
    unsigned char read_ids[24];
    const unsigned char *ids = status_send->ids;
    if (ctx != status_send->context) {
        if (uint_be(PyTuple_GET_ITEM(ctx, 0), read_ids, 16) < 0 || uint_be(PyTuple_GET_ITEM(ctx, 1), read_ids + 16, 8) < 0)
            return -1;
        ids = read_ids;
    }
    /* Times are made here and by time_ns(): non-negative, below 2**64 (the mask
     * conversion is a loop over the digits, not _PyLong_AsByteArray's). */
    if (_PyLong_Sign(start) < 0 || _PyLong_Sign(end) < 0)
        return 0;
    uint64_t t0 = PyLong_AsUnsignedLongLongMask(start), t1 = PyLong_AsUnsignedLongLongMask(end);
    if (PyErr_Occurred())
        return -1;
    Py_ssize_t name_len;
    const char *name_text = PyUnicode_AsUTF8AndSize(name, &name_len);
    if (name_text == NULL)
        return -1;
    /* The body's size: ids, name, kind, times, attributes, status and flags. */
    Py_ssize_t body = 2 + 16 + 2 + 8 + 2 + (t0 ? 9 : 0) + (t1 ? 9 : 0) + 8;
    if (name_len)
        body += 1 + varint_len((uint64_t)name_len) + name_len;
    AttrOut attrs[FAST_ATTRIBUTES];
    Py_ssize_t n_attrs = 0, pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(attributes, &pos, &key, &value)) {
        if (!PyUnicode_CheckExact(key) || n_attrs == FAST_ATTRIBUTES)
            return 0;
        AttrOut *a = &attrs[n_attrs++];
        a->key = PyUnicode_AsUTF8AndSize(key, &a->klen);
        if (a->key == NULL)
            return -1;
        a->tlen = a->vlen = 0;
        int ok = any_value(value, a->v, &a->vlen, &a->text, &a->tlen);
        if (ok <= 0)
            return ok;
        a->any_len = a->text != NULL ? 1 + varint_len((uint64_t)a->tlen) + a->tlen : a->vlen;
        a->kv_len = (a->klen ? 1 + varint_len((uint64_t)a->klen) + a->klen : 0) + 1 +
                    varint_len((uint64_t)a->any_len) + a->any_len;
        body += 1 + varint_len((uint64_t)a->kv_len) + a->kv_len;
    }
    Py_ssize_t field = 1 + varint_len((uint64_t)body) + body;
    if (buf_reserve(out, field) < 0)
        return -1;
    unsigned char *p = (unsigned char *)out->data + out->len, *first = p;
    p = put_head(p, 0x12, body);
    p = put_head(p, 0x0a, 16);
    memcpy(p, ids, 16);
    p = put_head(p + 16, 0x12, 8);
    memcpy(p, ids + 16, 8);
    p += 8;
    if (name_len) {
        p = put_head(p, 0x2a, name_len);
        memcpy(p, name_text, name_len);
        p += name_len;
    }
    *p++ = 0x30;
    *p++ = self->kind_byte;
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
    /* Status (unset), then SpanFlags: a local root. */
    static const unsigned char tail[] = {0x7a, 0x00, 0x85, 0x01, 0x00, 0x01, 0x00, 0x00};
    memcpy(p, tail, sizeof(tail));
    p += sizeof(tail);
    if (p - first != field) {
        PyErr_SetString(PyExc_SystemError, "encode_http_span: size mismatch");
        return -1;
    }
    out->len += field;
    return 1;
}

/* The ended, sampled `span` onto the sink's queue: written into `buffer` when it is
 * the usual span of this recorder, else as it is onto the queue list; dropped (and
 * counted by `drop`) past the bound. -1 on error. */
static int
queue_span(HttpSpans *self, SpanBuffer *buffer, PyObject *span, StatusSend *status_send)
{
    if (span_buffer_queued(buffer) >= buffer->limit) { /* the queue's bound; 0 once shut down */
        PyObject *r = PyObject_CallNoArgs(buffer->drop);
        Py_XDECREF(r);
        return r == NULL ? -1 : 0;
    }
    int written = 0;
    if (buffer->recorder == NULL || buffer->recorder == self->recorder) {
        if (buffer->count == buffer->ends_cap) {
            Py_ssize_t cap = buffer->ends_cap ? 2 * buffer->ends_cap : 512;
            Py_ssize_t *ends = PyMem_Realloc(buffer->ends, cap * sizeof(Py_ssize_t));
            if (ends == NULL) {
                PyErr_NoMemory();
                return -1;
            }
            buffer->ends = ends;
            buffer->ends_cap = cap;
        }
        written = encode_http_span(self, span, status_send, &buffer->buf);
        if (written < 0)
            return -1;
    }
    if (written) {
        buffer->ends[buffer->count++] = buffer->buf.len;
        if (buffer->recorder == NULL)
            buffer->recorder = Py_NewRef(self->recorder);
    } else if (PyList_Append(buffer->queue, span) < 0) {
        return -1;
    }
    return span_buffer_joined(buffer);
}

/* end(span, send, scope, token, error): end_request's work; None. */
static PyObject *
HttpSpans_end(HttpSpans *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "end(span, send, scope, token, error)");
        return NULL;
    }
    PyObject *span = args[0], *send = args[1], *scope = args[2], *token = args[3], *error = args[4];
    if (!Py_IS_TYPE(send, &StatusSendType) || Py_TYPE(span) != (PyTypeObject *)self->span_type || !PyDict_Check(scope)) {
        PyObject *fallback_args[4] = {span, scope, token, error};
        return PyObject_Vectorcall(self->end_fallback, fallback_args, 4, NULL);
    }
    StatusSend *status_send = (StatusSend *)send;
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
    long status = status_send->status;
    /* The ended span must not keep the request's objects alive (see end_request). */
    Py_CLEAR(status_send->send);
    const Layout *layout = self->layout;
    PyObject **end_slot = (PyObject **)((char *)span + layout->offset[F_END]);
    if (*end_slot != NULL && *end_slot != Py_None)
        Py_RETURN_NONE;
    if (error != Py_None || status >= 500 || status == 0) {
        PyObject *code = PyLong_FromLong(status);
        if (code == NULL)
            return NULL;
        PyObject *finish_args[4] = {span, scope, code, error};
        PyObject *r = PyObject_Vectorcall(self->finish, finish_args, 4, NULL);
        Py_DECREF(code);
        return r;
    }
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
        int same = PyUnicode_Check(route) ? PyUnicode_Compare(route, path) : -1;
        if (same == -1 && PyErr_Occurred())
            goto fail;
        if (same != 0) {
            PyObject *method = PyDict_GetItemWithError(scope, s_method);
            if (method == NULL) {
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_KeyError, "method");
                goto fail;
            }
            PyObject *name = PyUnicode_Check(method) && PyUnicode_Check(route) ? span_name(method, route)
                                                                                : PyUnicode_FromFormat("%S %S", method, route);
            if (name == NULL)
                goto fail;
            PyObject **name_slot = (PyObject **)((char *)span + layout->offset[F_NAME]);
            Py_XSETREF(*name_slot, name);
        }
    }
    PyObject *attributes = *(PyObject **)((char *)span + layout->offset[F_ATTRIBUTES]);
    PyObject *code = PyLong_FromLong(status);
    if (code == NULL || attributes == NULL || PyDict_SetItem(attributes, s_route_attr, route) < 0 ||
        PyDict_SetItem(attributes, s_status_attr, code) < 0) {
        Py_XDECREF(code);
        if (attributes == NULL && !PyErr_Occurred())
            PyErr_SetString(PyExc_AttributeError, "_attributes");
        goto fail;
    }
    Py_DECREF(code);
    Py_CLEAR(route);
    Py_CLEAR(path);
    /* ServerSpan.end */
    PyObject *end = now_ns();
    if (end == NULL)
        return NULL;
    Py_XSETREF(*end_slot, end);
    if (self->on_end != Py_None) {
        PyObject *context = *(PyObject **)((char *)span + layout->offset[F_CONTEXT]);
        long flags = 0;
        if (context != NULL && PyTuple_Check(context) && PyTuple_GET_SIZE(context) > 3) {
            flags = PyLong_AsLong(PyTuple_GET_ITEM(context, 3));
            if (flags == -1 && PyErr_Occurred())
                return NULL;
        }
        if (flags & 1) {
            if (Py_IS_TYPE(self->sink, &SpanBufferType)) { /* the sink takes it written: the span ends here */
                if (queue_span(self, (SpanBuffer *)self->sink, span, status_send) < 0)
                    return NULL;
                Py_RETURN_NONE;
            }
            PyObject *r = PyObject_CallOneArg(self->on_end, span);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
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
#undef INTERN
    if (pthread_atfork(NULL, NULL, ids_after_fork) != 0) {
        PyErr_SetString(PyExc_OSError, "pthread_atfork failed");
        return NULL;
    }
    if (PyType_Ready(&StatusSendType) < 0 || PyType_Ready(&HttpSpansType) < 0 || PyType_Ready(&EncodedSpanType) < 0 ||
        PyType_Ready(&SpanBufferType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "StatusSend", (PyObject *)&StatusSendType) < 0 ||
        PyModule_AddObjectRef(module, "HttpSpans", (PyObject *)&HttpSpansType) < 0 ||
        PyModule_AddObjectRef(module, "EncodedSpan", (PyObject *)&EncodedSpanType) < 0 ||
        PyModule_AddObjectRef(module, "SpanBuffer", (PyObject *)&SpanBufferType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
