/* The gateway's fast path for `/scored_data` bodies: parse, validate and re-encode a
 * group in one pass over the bytes, without building Python objects for its arrays.
 * The module docstring below (MODULE_DOC) describes the contract; the Python path in
 * services/gateway/trajectory/scored_data.py is the reference it is tested against
 * (tests/unit/test_scored_fast.py).
 *
 * Reading the input safely: a bytes object always has a NUL byte after its last byte
 * (CPython guarantees ob_sval[len] == 0). The parser never advances past a byte unless
 * that byte matched a class that excludes NUL (a digit, a quote, a bracket, a letter
 * of a literal, an ASCII string byte >= 0x20), and it reads at most one byte ahead of
 * the last byte it matched. So every read is at or before body[len], the NUL, which
 * matches nothing and ends every loop. A NUL inside the body is treated the same way
 * (it is invalid JSON everywhere), and the final check that the parse ended exactly at
 * body[len] tells the two apart.
 *
 * Recursion only happens when skipping an unknown key's value, and is bounded by
 * MAX_DEPTH. Every allocation is owned by a Ctx and freed in ctx_free on every path.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

PyDoc_STRVAR(MODULE_DOC,
"C fast path for Atropos ScoredData bodies (/scored_data and /scored_data_list).\n"
"\n"
"canonical_group(body: bytes, want_completions: bool, token_limit=None) -> tuple | None\n"
"canonical_groups(body: bytes, want_completions: bool, token_limit=None) -> list | None\n"
"\n"
"Each tuple is (encoded, size, env_id, policy_versions, completions):\n"
"  encoded          bytes: encode_group(parse_scored_data(body)), byte for byte (but see\n"
"                   'Float spelling' below)\n"
"  size             the number of sequences\n"
"  env_id           int or None\n"
"  policy_versions  tuple of (int | None), or None when absent/null/[] (an empty list\n"
"                   means none given, as scored_data.incoming takes it)\n"
"  completions      when want_completions: per sequence, the tuple of the token ids\n"
"                   whose mask != -100 (receipts.completion_tokens); else None\n"
"\n"
"Anything outside the fast path's domain returns None, and the caller then uses the\n"
"pydantic path, which gives the same result or a 4xx naming the field. The domain:\n"
"strict JSON (RFC 8259 whitespace, no NaN/Infinity, nothing after the value); keys\n"
"plain ASCII without escapes, no duplicate known key; unknown keys' values skipped\n"
"(strings there must be ASCII without escapes; nesting depth <= 64); int fields hold\n"
"JSON integers within int32 (no '-0', no fraction or exponent); env_id an int64;\n"
"policy_versions null or a list of null / 0..2**63-1; every check of\n"
"scored_data.group_problems holds, where an empty list in an optional per-sequence\n"
"field (advantages, ref_logprobs, inference_logprobs, distill_*, policy_versions)\n"
"means none given: it is kept as [] and not checked against the sequence count.\n"
"The free-form fields (Atropos BaseEnv's default group sends them empty):\n"
"messages and overrides null or []; images null, [] or {}; generation_params and\n"
"group_overrides null or a flat object of at most 64 entries, keys plain ASCII\n"
"without escapes and no duplicate, values plain ASCII strings without escapes,\n"
"true, false, null, JSON integers within int64 (no '-0'; kept as integers) or\n"
"floats (spelt as below). Nested values go to the Python path. With token_limit\n"
"(the door's checks, scored_data.door_problems): an empty sequence, a token id\n"
"outside [0, token_limit) or a negative env_id is declined too. Only TypeError is\n"
"raised (body not bytes), and MemoryError when memory runs out.\n"
"\n"
"Float spelling. Floats are re-spelt as Python's repr(float(x)) would spell them,\n"
"without converting to a double: the significant digits D of the literal (leading and\n"
"trailing zeros stripped) are kept, and only the layout changes (1e-5 -> 1e-05,\n"
"5 -> 5.0, 1E22 -> 1e+22, 0.50 -> 0.5). With at most 15 significant digits this is\n"
"exactly repr(float(x)) (DBL_DIG is 15: such a decimal survives the round trip through\n"
"a double, and no shorter one does). With 16 or 17 digits it is repr(float(x)) when\n"
"the producer wrote the shortest round-trip digits, as Python's json, orjson,\n"
"JavaScript, Go and Rust all do; otherwise (e.g. 0.10000000000000001, which repr spells\n"
"0.1) the VALUE is still identical, only the spelling differs from what Atropos would\n"
"print. This is a deliberate, documented departure. Literals with more than 17\n"
"significant digits, integer literals in float fields with more than 15 digits, '-0'\n"
"in a float field, and decimal exponents outside [-300, 300] go to the Python path.\n");

#define MAX_DEPTH 64
#define MAX_SIG 17
#define MAX_INT_AS_FLOAT_DIGITS 15
#define DECPT_MIN (-300)
#define DECPT_MAX 300
#define PROMPT_LABEL (-100)
/* Room kept free in the output beyond the input left to read: one float is written as
 * at most 24 bytes ("-1.2345678901234567e-100") from at least one input byte, and
 * parse_float_slow copies its digits in fixed 17-byte blocks, so it may scribble up
 * to 36 bytes past where it starts, and copy_digits_long stores 8 bytes at a time
 * (both later overwritten). */
#define SLACK 64

#if defined(__GNUC__) || defined(__clang__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define INLINE static inline __attribute__((always_inline))
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#define INLINE static inline
#endif

typedef unsigned char uchar;

enum {
    F_TOKENS,
    F_MASKS,
    F_SCORES,
    F_ADVANTAGES,
    F_REF_LOGPROBS,
    F_MESSAGES,
    F_GENERATION_PARAMS,
    F_INFERENCE_LOGPROBS,
    F_OVERRIDES,
    F_GROUP_OVERRIDES,
    F_IMAGES,
    F_ENV_ID,
    F_DISTILL_TOKEN_IDS,
    F_DISTILL_LOGPROBS,
    F_POLICY_VERSIONS,
    NFIELDS
};
#define N_ATROPOS_KEYS 14

static const char *const FIELD_NAMES[NFIELDS] = {
    "tokens", "masks", "scores", "advantages", "ref_logprobs", "messages",
    "generation_params", "inference_logprobs", "overrides", "group_overrides",
    "images", "env_id", "distill_token_ids", "distill_logprobs", "policy_versions",
};
static Py_ssize_t FIELD_NAME_LENS[NFIELDS];

/* The text before each field's value in the output: `{"tokens":`, `,"masks":`, ... */
static char KEY_TEXT[NFIELDS][24];
static Py_ssize_t KEY_TEXT_LENS[NFIELDS];

/* ------------------------------------------------------------------------------ */
/* Growable storage                                                                 */

typedef struct {
    char *base, *o, *lim; /* o: next byte to write; lim: end of the allocation */
} Buf;

typedef struct {
    int64_t *v;
    Py_ssize_t n, cap;
} Vec;

typedef struct {
    const uchar *p, *end;
    Buf out;
    Py_ssize_t seg_off[NFIELDS], seg_len[NFIELDS];
    unsigned seen, present;
    Vec lens[NFIELDS];   /* per sequence: row lengths (or row counts, distill_*) */
    Vec inner[2];        /* distill_token_ids / distill_logprobs inner row lengths */
    Py_ssize_t scores_n;
    Vec tokvals, maskvals; /* only when want_completions */
    Vec pv;                /* policy versions, -1 for null */
    int64_t env_id;
    int want;
    /* The door's checks (canonical_group's `token_limit`): when > 0, tokens outside
     * [0, token_limit), an empty sequence or a negative env_id are declined. */
    int64_t token_limit;
    int nomem;
} Ctx;

static int
buf_reserve(Ctx *c, size_t need)
{
    Buf *b = &c->out;
    if ((size_t)(b->lim - b->o) >= need)
        return 0;
    size_t used = (size_t)(b->o - b->base);
    size_t cap = (size_t)(b->lim - b->base);
    size_t ncap = cap ? cap : 4096;
    if (need > (size_t)PY_SSIZE_T_MAX - used) {
        c->nomem = 1;
        return -1;
    }
    while (ncap - used < need) {
        if (ncap > (size_t)PY_SSIZE_T_MAX / 2) {
            c->nomem = 1;
            return -1;
        }
        ncap *= 2;
    }
    char *nb = (char *)PyMem_RawRealloc(b->base, ncap);
    if (nb == NULL) {
        c->nomem = 1;
        return -1;
    }
    b->base = nb;
    b->o = nb + used;
    b->lim = nb + ncap;
    return 0;
}

/* Keep room for everything left to read (plus SLACK): integers, literals and
 * punctuation are copied at most one output byte per input byte. */
INLINE int
reserve_for_rest(Ctx *c)
{
    return buf_reserve(c, (size_t)(c->end - c->p) + SLACK);
}

static int
vec_grow(Ctx *c, Vec *x)
{
    Py_ssize_t ncap = x->cap ? x->cap * 2 : 64;
    if (ncap > PY_SSIZE_T_MAX / (Py_ssize_t)sizeof(int64_t)) {
        c->nomem = 1;
        return -1;
    }
    int64_t *nv = (int64_t *)PyMem_RawRealloc(x->v, (size_t)ncap * sizeof(int64_t));
    if (nv == NULL) {
        c->nomem = 1;
        return -1;
    }
    x->v = nv;
    x->cap = ncap;
    return 0;
}

INLINE int
vec_push(Ctx *c, Vec *x, int64_t value)
{
    if (UNLIKELY(x->n == x->cap) && vec_grow(c, x) < 0)
        return -1;
    x->v[x->n++] = value;
    return 0;
}

static void
vec_free(Vec *x)
{
    PyMem_RawFree(x->v);
    x->v = NULL;
    x->n = x->cap = 0;
}

/* Ready for the next group (of the same body): output and lengths emptied. */
static void
ctx_reset(Ctx *c)
{
    c->out.o = c->out.base;
    c->seen = c->present = 0;
    for (int i = 0; i < NFIELDS; i++) {
        c->lens[i].n = 0;
        c->seg_off[i] = c->seg_len[i] = 0;
    }
    c->inner[0].n = c->inner[1].n = 0;
    c->tokvals.n = c->maskvals.n = c->pv.n = 0;
    c->scores_n = 0;
    c->env_id = 0;
}

static void
ctx_free(Ctx *c)
{
    PyMem_RawFree(c->out.base);
    c->out.base = c->out.o = c->out.lim = NULL;
    for (int i = 0; i < NFIELDS; i++)
        vec_free(&c->lens[i]);
    vec_free(&c->inner[0]);
    vec_free(&c->inner[1]);
    vec_free(&c->tokvals);
    vec_free(&c->maskvals);
    vec_free(&c->pv);
}

/* ------------------------------------------------------------------------------ */
/* Scanning                                                                         */

INLINE const uchar *
skip_ws(const uchar *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')
        p++;
    return p;
}

INLINE int
is_digit(uchar ch)
{
    return (unsigned)(ch - '0') <= 9u;
}

/* The punctuation of a JSON array or object, read at *pp and nothing written. Every
 * array and object is parsed as
 *     r = seq_open(&p, '[', ']');
 *     while (r == 0) { element; r = seq_next(&p, ']'); }
 *     r < 0: invalid; r == 1: closed, *pp just past the closing bracket.
 * seq_open: -1 when *pp is not `open`; else skips it and the whitespace after it and
 * answers 1 for an empty one (`close` skipped too), 0 when an element follows. */
INLINE int
seq_open(const uchar **pp, uchar open, uchar close)
{
    const uchar *p = *pp;
    if (*p != open)
        return -1;
    p = skip_ws(p + 1);
    if (*p == close) {
        *pp = p + 1;
        return 1;
    }
    *pp = p;
    return 0;
}

/* After an element: 0 for a ',' (skipped, with the whitespace around it: another
 * element follows), 1 for `close` (skipped: the end), -1 for anything else. */
INLINE int
seq_next(const uchar **pp, uchar close)
{
    const uchar *p = skip_ws(*pp);
    if (*p == ',') {
        *pp = skip_ws(p + 1);
        return 0;
    }
    if (*p == close) {
        *pp = p + 1;
        return 1;
    }
    return -1;
}

/* seq_open and seq_next for a list at c->p that is copied to the output: its
 * brackets and commas are written as they are read (whitespace dropped). The output
 * must have room for them (reserve_for_rest: one output byte per input byte). */
INLINE int
list_open(Ctx *c)
{
    int r = seq_open(&c->p, '[', ']');
    if (r >= 0) {
        *c->out.o++ = '[';
        if (r)
            *c->out.o++ = ']';
    }
    return r;
}

INLINE int
list_next(Ctx *c)
{
    int r = seq_next(&c->p, ']');
    if (r >= 0)
        *c->out.o++ = r ? ']' : ',';
    return r;
}

/* Copy the run of digits at p to *op; returns the first byte after the run. Byte by
 * byte, for the short runs of token ids and integer parts. */
INLINE const uchar *
copy_digits(const uchar *p, char **op)
{
    char *o = *op;
    Py_ssize_t k = 0;
    uchar ch;
    /* Indexed: gcc turns `*o++ = *p++` into the slow `movsb`. */
    while ((unsigned)((ch = p[k]) - '0') <= 9u) {
        o[k] = (char)ch;
        k++;
    }
    *op = o + k;
    return p + k;
}

/* copy_digits for the long runs of a fraction (float32 logprobs have 16-17 digits):
 * eight bytes at a time where eight bytes can be read (up to and including the NUL at
 * body[len]). A byte is a digit when its high nibble is 3 and adding 6 keeps it 3;
 * adding 6 can carry into the next byte only out of a byte >= 0xFA, which is not a
 * digit, so the first non-digit byte is always found correctly. The eight bytes are
 * stored whole: the output keeps SLACK bytes of room, and what lies past the run is
 * overwritten next. (Slower than copy_digits for runs of one to five digits.) */
INLINE const uchar *
copy_digits_long(const uchar *p, const uchar *end, char **op)
{
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    char *o = *op;
    while (end - p >= 7) {
        uint64_t x;
        memcpy(&x, p, 8);
        const uint64_t hi = 0xF0F0F0F0F0F0F0F0ull, threes = 0x3030303030303030ull;
        uint64_t bad = ((x & hi) ^ threes) | (((x + 0x0606060606060606ull) & hi) ^ threes);
        memcpy(o, &x, 8);
        if (bad == 0) {
            p += 8;
            o += 8;
            continue;
        }
        int n = __builtin_ctzll(bad) >> 3;
        *op = o + n;
        return p + n;
    }
    *op = o;
#else
    (void)end;
#endif
    return copy_digits(p, op);
}

/* An int32 JSON integer at *pp, copied to *op; its value in *value when `want_value`.
 * Whatever follows it is the caller's to check (a digit after "0", a '.', an 'e' all
 * fail there). */
INLINE int
parse_i32(const uchar **pp, char **op, int want_value, int64_t *value)
{
    const uchar *p = *pp;
    char *o = *op;
    int neg = 0;
    if (*p == '-') {
        neg = 1;
        *o++ = '-';
        p++;
    }
    const uchar *ds = p;
    if (*p == '0') {
        if (neg)
            return -1; /* "-0" */
        *o++ = '0';
        p++;
        *value = 0;
        goto done;
    }
    if (!is_digit(*p))
        return -1;
    p = copy_digits(p, &o);
    Py_ssize_t k = p - ds;
    if (UNLIKELY(k >= 10)) {
        if (k > 10)
            return -1;
        /* Ten digits: compare with 2147483647 (or 2147483648) digit by digit. */
        const char *limit = neg ? "2147483648" : "2147483647";
        for (int i = 0; i < 10; i++) {
            if ((char)ds[i] != limit[i]) {
                if ((char)ds[i] > limit[i])
                    return -1;
                break;
            }
        }
    }
    if (want_value) {
        int64_t v = 0;
        for (Py_ssize_t i = 0; i < k; i++)
            v = v * 10 + (ds[i] - '0');
        *value = neg ? -v : v;
    }
done:
    *pp = p;
    *op = o;
    return 0;
}

/* A JSON integer within [nonneg ? 0 : INT64_MIN, INT64_MAX] at c->p, copied to the
 * output ("-0" declined: Python reads it as 0). */
static int
parse_i64(Ctx *c, int nonneg, int64_t *value)
{
    const uchar *p = c->p;
    char *o = c->out.o;
    int neg = 0;
    if (*p == '-') {
        if (nonneg)
            return -1;
        neg = 1;
        *o++ = '-';
        p++;
    }
    unsigned d = (unsigned)(*p - '0');
    if (d > 9u)
        return -1;
    uint64_t v = d;
    *o++ = (char)*p++;
    if (d == 0) {
        if (neg)
            return -1;
    }
    else {
        int nd = 1;
        while ((d = (unsigned)(*p - '0')) <= 9u) {
            if (++nd > 19)
                return -1;
            v = v * 10 + d;
            *o++ = (char)*p++;
        }
        /* 19 digits fit in uint64 without overflow. */
        if (v > (uint64_t)INT64_MAX + (uint64_t)neg)
            return -1;
    }
    *value = neg ? (int64_t)(0 - v) : (int64_t)v;
    c->p = p;
    c->out.o = o;
    return 0;
}

/* A JSON number at *pp written as repr(float(x)) would write it (see MODULE_DOC):
 * the general case. Writes at most 24 bytes. */
static int
parse_float_slow(const uchar **pp, char **op)
{
    const uchar *p = *pp;
    char *o = *op;
    int neg = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    char D[48] = {0}; /* digits; copied in fixed 17-byte blocks (see SLACK) */
    int nd = 0, over = 0, is_int = 1;
    Py_ssize_t decpt = 0;
    const uchar *ds = p;
    unsigned d = (unsigned)(*p - '0');
    if (d == 0) {
        p++;
    }
    else if (d <= 9u) {
        do {
            if (nd < MAX_SIG)
                D[nd++] = (char)*p;
            else if (d)
                over = 1;
            decpt++;
            p++;
        } while ((d = (unsigned)(*p - '0')) <= 9u);
    }
    else {
        return -1;
    }
    if (*p == '.') {
        is_int = 0;
        p++;
        if (!is_digit(*p))
            return -1;
        do {
            d = (unsigned)(*p - '0');
            if (nd == 0 && d == 0)
                decpt--;
            else if (nd < MAX_SIG)
                D[nd++] = (char)*p;
            else if (d)
                over = 1;
            p++;
        } while (is_digit(*p));
    }
    int exp = 0;
    if ((*p | 0x20) == 'e') {
        is_int = 0;
        p++;
        int eneg = 0;
        if (*p == '-') {
            eneg = 1;
            p++;
        }
        else if (*p == '+') {
            p++;
        }
        if (!is_digit(*p))
            return -1;
        do {
            if (exp < 100000)
                exp = exp * 10 + (*p - '0');
            p++;
        } while (is_digit(*p));
        if (eneg)
            exp = -exp;
    }
    if (is_int) {
        Py_ssize_t len = p - ds;
        if (len > MAX_INT_AS_FLOAT_DIGITS)
            return -1;
        if (neg && len == 1 && *ds == '0')
            return -1; /* "-0": Python makes it 0.0, not -0.0; leave it to Python */
        if (neg)
            *o++ = '-';
        memcpy(o, ds, (size_t)len);
        o += len;
        *o++ = '.';
        *o++ = '0';
        goto done;
    }
    if (over)
        return -1;
    while (nd > 0 && D[nd - 1] == '0')
        nd--;
    if (neg)
        *o++ = '-';
    if (nd == 0) {
        *o++ = '0';
        *o++ = '.';
        *o++ = '0';
        goto done;
    }
    decpt += exp;
    if (decpt < DECPT_MIN || decpt > DECPT_MAX)
        return -1;
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            *o++ = '0';
            *o++ = '.';
            for (Py_ssize_t k = decpt; k < 0; k++)
                *o++ = '0';
            memcpy(o, D, MAX_SIG);
            o += nd;
        }
        else if (decpt >= nd) {
            memcpy(o, D, MAX_SIG);
            o += nd;
            for (Py_ssize_t k = nd; k < decpt; k++)
                *o++ = '0';
            *o++ = '.';
            *o++ = '0';
        }
        else {
            memcpy(o, D, MAX_SIG);
            o += decpt;
            *o++ = '.';
            memcpy(o, D + decpt, MAX_SIG);
            o += nd - decpt;
        }
    }
    else {
        *o++ = D[0];
        if (nd > 1) {
            *o++ = '.';
            memcpy(o, D + 1, MAX_SIG);
            o += nd - 1;
        }
        *o++ = 'e';
        int x = (int)(decpt - 1);
        if (x < 0) {
            *o++ = '-';
            x = -x;
        }
        else {
            *o++ = '+';
        }
        if (x >= 100) {
            *o++ = (char)('0' + x / 100);
            x %= 100;
        }
        *o++ = (char)('0' + x / 10);
        *o++ = (char)('0' + x % 10);
    }
done:
    *pp = p;
    *op = o;
    return 0;
}

/* A JSON number at *pp written as repr(float(x)) would write it. Literals that are
 * already spelt that way (-0.5, 1.0, -2.0036160945892334, 3280.75, 12) are copied as
 * they are scanned; anything else is re-read by parse_float_slow. */
INLINE int
parse_float(const uchar **pp, const uchar *end, char **op)
{
    const uchar *p = *pp;
    char *o = *op;
    int neg = 0;
    if (*p == '-') {
        neg = 1;
        *o++ = '-';
        p++;
    }
    const uchar *ip = p;
    if (*p == '0') {
        *o++ = '0';
        p++;
    }
    else if (is_digit(*p)) {
        p = copy_digits(p, &o);
    }
    else {
        return -1;
    }
    Py_ssize_t L = p - ip;
    if (*p == '.') {
        *o++ = '.';
        p++;
        const uchar *fp = p;
        if (!is_digit(*p))
            return -1;
        p = copy_digits_long(p, end, &o);
        Py_ssize_t F = p - fp;
        if ((*p | 0x20) != 'e') {
            if (F == 1 && *fp == '0') {
                if (L <= 16)
                    goto done; /* "I.0": D is I without trailing zeros, decpt = L */
            }
            else if (p[-1] != '0') {
                if (L == 1 && *ip == '0') {
                    Py_ssize_t z = 0; /* "0.000F": decpt = -z, fixed while z <= 3 */
                    while (fp[z] == '0')
                        z++;
                    if (z <= 3 && F - z <= MAX_SIG)
                        goto done;
                }
                else if (L + F <= MAX_SIG) {
                    goto done; /* "I.F": decpt = L <= 16 */
                }
            }
        }
    }
    else if ((*p | 0x20) != 'e') {
        if (L > MAX_INT_AS_FLOAT_DIGITS || (neg && L == 1 && *ip == '0'))
            return -1; /* see parse_float_slow */
        *o++ = '.';
        *o++ = '0';
        goto done;
    }
    return parse_float_slow(pp, op);
done:
    *pp = p;
    *op = o;
    return 0;
}

/* A flat list of numbers at c->p: ints (int32, values pushed to `vals` when given)
 * or floats. Its length in *count. */
INLINE int
parse_flat(Ctx *c, int floats, Py_ssize_t *count, Vec *vals)
{
    Py_ssize_t n = 0;
    int r = list_open(c);
    /* The numbers are read and written through locals (kept in registers). */
    const uchar *p = c->p;
    char *o = c->out.o;
    while (r == 0) {
        if (floats) {
            /* Keep the invariant "room >= input left + SLACK" across a float. */
            if (UNLIKELY((size_t)(c->out.lim - o) < (size_t)(c->end - p) + SLACK)) {
                c->out.o = o;
                if (buf_reserve(c, (size_t)(c->end - p) + SLACK) < 0)
                    return -1;
                o = c->out.o;
            }
            if (parse_float(&p, c->end, &o) < 0)
                return -1;
        }
        else {
            int64_t v;
            if (parse_i32(&p, &o, vals != NULL, &v) < 0)
                return -1;
            if (vals != NULL && vec_push(c, vals, v) < 0)
                return -1;
        }
        n++;
        /* The common case inline: a ',' right after the number. */
        if (*p == ',') {
            *o++ = ',';
            p++;
            if (UNLIKELY(*p <= ' '))
                p = skip_ws(p);
            continue;
        }
        c->p = p;
        c->out.o = o;
        r = list_next(c);
        p = c->p;
        o = c->out.o;
    }
    c->p = p;
    c->out.o = o;
    *count = n;
    return r < 0 ? -1 : 0;
}

/* A list of lists of numbers at c->p; each row's length pushed to `lens`; the number
 * of rows in *rows. */
INLINE int
parse_rows(Ctx *c, int floats, Vec *lens, Vec *vals, Py_ssize_t *rows)
{
    Py_ssize_t n = 0;
    int r = list_open(c);
    while (r == 0) {
        Py_ssize_t len;
        if (parse_flat(c, floats, &len, vals) < 0)
            return -1;
        if (vec_push(c, lens, len) < 0)
            return -1;
        n++;
        r = list_next(c);
    }
    *rows = n;
    return r < 0 ? -1 : 0;
}

/* A list (per sequence) of lists (positions) of lists of numbers (distill_*). */
static int
parse_rows3(Ctx *c, int floats, Vec *counts, Vec *inner)
{
    int r = list_open(c);
    while (r == 0) {
        Py_ssize_t rows;
        if (parse_rows(c, floats, inner, NULL, &rows) < 0)
            return -1;
        if (vec_push(c, counts, rows) < 0)
            return -1;
        r = list_next(c);
    }
    return r < 0 ? -1 : 0;
}

/* policy_versions: a list of null or 0..2**63-1. */
static int
parse_policy_versions(Ctx *c)
{
    int r = list_open(c);
    while (r == 0) {
        const uchar *p = c->p;
        if (p[0] == 'n' && p[1] == 'u' && p[2] == 'l' && p[3] == 'l') {
            memcpy(c->out.o, "null", 4);
            c->out.o += 4;
            c->p = p + 4;
            if (vec_push(c, &c->pv, -1) < 0)
                return -1;
        }
        else {
            int64_t v;
            if (parse_i64(c, 1, &v) < 0)
                return -1;
            if (vec_push(c, &c->pv, v) < 0)
                return -1;
        }
        r = list_next(c);
    }
    return r < 0 ? -1 : 0;
}

/* A string at p (the opening quote): printable ASCII without escapes only. */
INLINE const uchar *
skip_plain_string(const uchar *p)
{
    p++;
    for (;;) {
        uchar ch = *p;
        if (ch == '"')
            return p + 1;
        if (ch < 0x20 || ch >= 0x80 || ch == '\\')
            return NULL;
        p++;
    }
}

/* Any JSON number (strict grammar), without output. */
static const uchar *
skip_number(const uchar *p)
{
    if (*p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (is_digit(*p))
        while (is_digit(*p))
            p++;
    else
        return NULL;
    if (*p == '.') {
        p++;
        if (!is_digit(*p))
            return NULL;
        while (is_digit(*p))
            p++;
    }
    if ((*p | 0x20) == 'e') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (!is_digit(*p))
            return NULL;
        while (is_digit(*p))
            p++;
    }
    return p;
}

/* Any JSON value at p (whitespace skipped), nested at `depth`. */
static const uchar *
skip_value(const uchar *p, int depth)
{
    if (depth > MAX_DEPTH)
        return NULL;
    int r;
    switch (*p) {
    case '{':
        r = seq_open(&p, '{', '}');
        while (r == 0) {
            if (*p != '"' || (p = skip_plain_string(p)) == NULL)
                return NULL;
            p = skip_ws(p);
            if (*p != ':')
                return NULL;
            p = skip_ws(p + 1);
            if ((p = skip_value(p, depth + 1)) == NULL)
                return NULL;
            r = seq_next(&p, '}');
        }
        return r < 0 ? NULL : p;
    case '[':
        r = seq_open(&p, '[', ']');
        while (r == 0) {
            if ((p = skip_value(p, depth + 1)) == NULL)
                return NULL;
            r = seq_next(&p, ']');
        }
        return r < 0 ? NULL : p;
    case '"':
        return skip_plain_string(p);
    case 't':
        return (p[1] == 'r' && p[2] == 'u' && p[3] == 'e') ? p + 4 : NULL;
    case 'f':
        return (p[1] == 'a' && p[2] == 'l' && p[3] == 's' && p[4] == 'e') ? p + 5 : NULL;
    case 'n':
        return (p[1] == 'u' && p[2] == 'l' && p[3] == 'l') ? p + 4 : NULL;
    default:
        return skip_number(p);
    }
}

/* An empty `open``close` ([] or {}) at c->p, written as such (never longer than it
 * was read). */
static int
parse_empty(Ctx *c, uchar open, uchar close)
{
    if (seq_open(&c->p, open, close) != 1)
        return -1;
    *c->out.o++ = (char)open;
    *c->out.o++ = (char)close;
    return 0;
}

/* One value of a flat free-form object at c->p: a plain ASCII string, a literal or
 * an int64 integer copied as it is, or a float spelt as in float fields (the value
 * Python keeps is a float: encode_group writes it as repr does). Anything else
 * (an array, an object, an escaped or non-ASCII string, '-0', a huge integer) -1. */
static int
parse_scalar(Ctx *c)
{
    const uchar *p = c->p, *q;
    switch (*p) {
    case '"':
        if ((q = skip_plain_string(p)) == NULL)
            return -1;
        break;
    case 't':
        if (!(p[1] == 'r' && p[2] == 'u' && p[3] == 'e'))
            return -1;
        q = p + 4;
        break;
    case 'f':
        if (!(p[1] == 'a' && p[2] == 'l' && p[3] == 's' && p[4] == 'e'))
            return -1;
        q = p + 5;
        break;
    case 'n':
        if (!(p[1] == 'u' && p[2] == 'l' && p[3] == 'l'))
            return -1;
        q = p + 4;
        break;
    default: {
        if ((q = skip_number(p)) == NULL)
            return -1;
        const uchar *x = p;
        while (x < q && *x != '.' && (*x | 0x20) != 'e')
            x++;
        if (x == q) {
            int64_t v;
            return parse_i64(c, 0, &v);
        }
        /* A float can be written longer than it was read (1e15): keep the room. */
        if (reserve_for_rest(c) < 0)
            return -1;
        return parse_float(&c->p, c->end, &c->out.o);
    }
    }
    memcpy(c->out.o, p, (size_t)(q - p));
    c->out.o += q - p;
    c->p = q;
    return 0;
}

/* generation_params and group_overrides: {} or a flat object of scalars (see
 * parse_scalar), written compact in input order. Duplicate keys are left to Python
 * (it keeps the last value at the first key's place); so are more than
 * MAX_FLAT_ENTRIES entries (the duplicate check compares every pair). */
#define MAX_FLAT_ENTRIES 64
static int
parse_flat_object(Ctx *c)
{
    const uchar *keys[MAX_FLAT_ENTRIES];
    Py_ssize_t key_lens[MAX_FLAT_ENTRIES];
    int nkeys = 0;
    int r = seq_open(&c->p, '{', '}');
    if (r < 0)
        return -1;
    *c->out.o++ = '{';
    if (r)
        *c->out.o++ = '}';
    while (r == 0) {
        const uchar *key = c->p, *after;
        if (*key != '"' || (after = skip_plain_string(key)) == NULL)
            return -1;
        Py_ssize_t len = after - key; /* with its quotes */
        if (nkeys == MAX_FLAT_ENTRIES)
            return -1;
        for (int i = 0; i < nkeys; i++)
            if (key_lens[i] == len && memcmp(keys[i], key, (size_t)len) == 0)
                return -1;
        keys[nkeys] = key;
        key_lens[nkeys++] = len;
        const uchar *p = skip_ws(after);
        if (*p != ':')
            return -1;
        /* The key and its colon: no longer than they were read. */
        memcpy(c->out.o, key, (size_t)len);
        c->out.o += len;
        *c->out.o++ = ':';
        c->p = skip_ws(p + 1);
        if (parse_scalar(c) < 0)
            return -1;
        r = seq_next(&c->p, '}');
        if (r >= 0)
            *c->out.o++ = r ? '}' : ',';
    }
    return r < 0 ? -1 : 0;
}

static int
field_id(const uchar *key, Py_ssize_t len)
{
    for (int i = 0; i < NFIELDS; i++)
        if (FIELD_NAME_LENS[i] == len && memcmp(FIELD_NAMES[i], key, (size_t)len) == 0)
            return i;
    return -1;
}

/* One known field's value at c->p (not null). */
static int
parse_field(Ctx *c, int id)
{
    Py_ssize_t count;
    if (reserve_for_rest(c) < 0)
        return -1;
    switch (id) {
    case F_TOKENS:
        return parse_rows(c, 0, &c->lens[F_TOKENS], c->want || c->token_limit ? &c->tokvals : NULL, &count);
    case F_MASKS:
        return parse_rows(c, 0, &c->lens[F_MASKS], c->want ? &c->maskvals : NULL, &count);
    case F_SCORES:
        return parse_flat(c, 1, &c->scores_n, NULL);
    case F_ADVANTAGES:
    case F_REF_LOGPROBS:
    case F_INFERENCE_LOGPROBS:
        return parse_rows(c, 1, &c->lens[id], NULL, &count);
    case F_DISTILL_TOKEN_IDS:
        return parse_rows3(c, 0, &c->lens[id], &c->inner[0]);
    case F_DISTILL_LOGPROBS:
        return parse_rows3(c, 1, &c->lens[id], &c->inner[1]);
    case F_ENV_ID:
        return parse_i64(c, 0, &c->env_id);
    case F_POLICY_VERSIONS:
        return parse_policy_versions(c);
    case F_MESSAGES:
    case F_OVERRIDES:
        return parse_empty(c, '[', ']');
    case F_IMAGES:
        return *c->p == '[' ? parse_empty(c, '[', ']') : parse_empty(c, '{', '}');
    case F_GENERATION_PARAMS:
    case F_GROUP_OVERRIDES:
        return parse_flat_object(c);
    default:
        return -1;
    }
}

static int
same_lens(const Vec *a, const Vec *b)
{
    return a->n == b->n && (a->n == 0 || memcmp(a->v, b->v, (size_t)a->n * sizeof(int64_t)) == 0);
}

#define HAS(c, id) (((c)->present >> (id)) & 1u)
/* An optional per-sequence field given: present and not [] (group_problems'
 * per_sequence: an empty list means none given; n > 0 wherever this is asked).
 * lens[id] has one entry per sequence for these fields. */
#define GIVEN(c, id) (HAS(c, id) && (c)->lens[id].n != 0)
#define PV_GIVEN(c) (HAS(c, F_POLICY_VERSIONS) && (c)->pv.n != 0)

/* scored_data.group_problems, for the fields the fast path accepts. masks and
 * scores must have one entry per sequence even when [] (required fields). */
static int
check_group(Ctx *c)
{
    Py_ssize_t n = c->lens[F_TOKENS].n;
    if (n == 0)
        return -1;
    if (!same_lens(&c->lens[F_MASKS], &c->lens[F_TOKENS]))
        return -1;
    if (c->scores_n != n)
        return -1;
    static const int per_token[] = {F_ADVANTAGES, F_REF_LOGPROBS, F_INFERENCE_LOGPROBS};
    for (int k = 0; k < 3; k++) {
        int id = per_token[k];
        if (GIVEN(c, id) && !same_lens(&c->lens[id], &c->lens[F_TOKENS]))
            return -1;
    }
    if (PV_GIVEN(c) && c->pv.n != n)
        return -1;
    if (GIVEN(c, F_DISTILL_TOKEN_IDS) && c->lens[F_DISTILL_TOKEN_IDS].n != n)
        return -1;
    if (GIVEN(c, F_DISTILL_LOGPROBS) && c->lens[F_DISTILL_LOGPROBS].n != n)
        return -1;
    if (GIVEN(c, F_DISTILL_TOKEN_IDS) && GIVEN(c, F_DISTILL_LOGPROBS)) {
        /* Same positions per sequence, then the same inner lengths in order. */
        if (!same_lens(&c->lens[F_DISTILL_TOKEN_IDS], &c->lens[F_DISTILL_LOGPROBS]))
            return -1;
        if (!same_lens(&c->inner[0], &c->inner[1]))
            return -1;
    }
    return 0;
}

/* scored_data.door_problems, for what the fast path sees: every sequence has a
 * token, every token id is in [0, token_limit), env_id is not negative (the
 * non-finite floats door_problems refuses are never accepted here). */
static int
check_door(Ctx *c)
{
    const Vec *lens = &c->lens[F_TOKENS];
    for (Py_ssize_t i = 0; i < lens->n; i++)
        if (lens->v[i] == 0)
            return -1;
    const int64_t *tok = c->tokvals.v;
    for (Py_ssize_t j = 0; j < c->tokvals.n; j++)
        if (tok[j] < 0 || tok[j] >= c->token_limit)
            return -1;
    if (HAS(c, F_ENV_ID) && c->env_id < 0)
        return -1;
    return 0;
}

/* A group object at c->p (whitespace skipped), nested at `depth`. */
static int
parse_group(Ctx *c, int depth)
{
    int r = seq_open(&c->p, '{', '}');
    if (r != 0)
        return -1; /* not an object, or {}: tokens, masks and scores are required */
    while (r == 0) {
        const uchar *key = c->p;
        const uchar *after;
        if (*key != '"' || (after = skip_plain_string(key)) == NULL)
            return -1;
        int id = field_id(key + 1, after - key - 2);
        c->p = skip_ws(after);
        if (*c->p != ':')
            return -1;
        c->p = skip_ws(c->p + 1);
        if (id >= 0) {
            unsigned bit = 1u << id;
            if (c->seen & bit)
                return -1; /* duplicate key: Python keeps the last, leave it to Python */
            c->seen |= bit;
            const uchar *p = c->p;
            if (p[0] == 'n' && p[1] == 'u' && p[2] == 'l' && p[3] == 'l') {
                if (id == F_TOKENS || id == F_MASKS || id == F_SCORES)
                    return -1;
                c->p = p + 4;
            }
            else {
                c->seg_off[id] = c->out.o - c->out.base;
                if (parse_field(c, id) < 0)
                    return -1;
                c->seg_len[id] = (c->out.o - c->out.base) - c->seg_off[id];
                c->present |= bit;
            }
        }
        else {
            const uchar *p = skip_value(c->p, depth + 1);
            if (p == NULL)
                return -1;
            c->p = p;
        }
        r = seq_next(&c->p, '}');
    }
    if (r < 0)
        return -1;
    const unsigned required = (1u << F_TOKENS) | (1u << F_MASKS) | (1u << F_SCORES);
    if ((c->present & required) != required)
        return -1;
    if (check_group(c) < 0)
        return -1;
    return c->token_limit > 0 ? check_door(c) : 0;
}

/* ------------------------------------------------------------------------------ */
/* Results                                                                          */

static PyObject *
build_completions(Ctx *c)
{
    const Vec *lens = &c->lens[F_TOKENS];
    PyObject *all = PyTuple_New(lens->n);
    if (all == NULL)
        return NULL;
    const int64_t *tok = c->tokvals.v, *mask = c->maskvals.v;
    Py_ssize_t off = 0;
    for (Py_ssize_t i = 0; i < lens->n; i++) {
        Py_ssize_t len = (Py_ssize_t)lens->v[i], k = 0;
        for (Py_ssize_t j = off; j < off + len; j++)
            k += mask[j] != PROMPT_LABEL;
        PyObject *row = PyTuple_New(k);
        if (row == NULL) {
            Py_DECREF(all);
            return NULL;
        }
        PyTuple_SET_ITEM(all, i, row);
        k = 0;
        for (Py_ssize_t j = off; j < off + len; j++) {
            if (mask[j] != PROMPT_LABEL) {
                PyObject *v = PyLong_FromLongLong(tok[j]);
                if (v == NULL) {
                    Py_DECREF(all);
                    return NULL;
                }
                PyTuple_SET_ITEM(row, k++, v);
            }
        }
        off += len;
    }
    return all;
}

static PyObject *
build_result(Ctx *c)
{
    Py_ssize_t total = 1; /* the closing brace */
    for (int i = 0; i < N_ATROPOS_KEYS; i++)
        total += KEY_TEXT_LENS[i] + (HAS(c, i) ? c->seg_len[i] : 4);
    if (HAS(c, F_POLICY_VERSIONS))
        total += KEY_TEXT_LENS[F_POLICY_VERSIONS] + c->seg_len[F_POLICY_VERSIONS];

    PyObject *encoded = NULL, *size = NULL, *env = NULL, *pv = NULL, *comp = NULL;
    encoded = PyBytes_FromStringAndSize(NULL, total);
    if (encoded == NULL)
        goto fail;
    char *w = PyBytes_AS_STRING(encoded);
    for (int i = 0; i < NFIELDS; i++) {
        if (i == F_POLICY_VERSIONS && !HAS(c, i))
            break;
        memcpy(w, KEY_TEXT[i], (size_t)KEY_TEXT_LENS[i]);
        w += KEY_TEXT_LENS[i];
        if (HAS(c, i)) {
            memcpy(w, c->out.base + c->seg_off[i], (size_t)c->seg_len[i]);
            w += c->seg_len[i];
        }
        else {
            memcpy(w, "null", 4);
            w += 4;
        }
    }
    *w++ = '}';
    assert(w == PyBytes_AS_STRING(encoded) + total);

    size = PyLong_FromSsize_t(c->lens[F_TOKENS].n);
    if (size == NULL)
        goto fail;
    if (HAS(c, F_ENV_ID)) {
        env = PyLong_FromLongLong(c->env_id);
        if (env == NULL)
            goto fail;
    }
    else {
        env = Py_NewRef(Py_None);
    }
    if (PV_GIVEN(c)) {
        pv = PyTuple_New(c->pv.n);
        if (pv == NULL)
            goto fail;
        for (Py_ssize_t i = 0; i < c->pv.n; i++) {
            PyObject *v = c->pv.v[i] < 0 ? Py_NewRef(Py_None) : PyLong_FromLongLong(c->pv.v[i]);
            if (v == NULL)
                goto fail;
            PyTuple_SET_ITEM(pv, i, v);
        }
    }
    else {
        pv = Py_NewRef(Py_None);
    }
    if (c->want) {
        comp = build_completions(c);
        if (comp == NULL)
            goto fail;
    }
    else {
        comp = Py_NewRef(Py_None);
    }
    PyObject *result = PyTuple_New(5);
    if (result == NULL)
        goto fail;
    PyTuple_SET_ITEM(result, 0, encoded);
    PyTuple_SET_ITEM(result, 1, size);
    PyTuple_SET_ITEM(result, 2, env);
    PyTuple_SET_ITEM(result, 3, pv);
    PyTuple_SET_ITEM(result, 4, comp);
    return result;
fail:
    Py_XDECREF(encoded);
    Py_XDECREF(size);
    Py_XDECREF(env);
    Py_XDECREF(pv);
    Py_XDECREF(comp);
    return NULL;
}

/* ------------------------------------------------------------------------------ */
/* Module functions                                                                 */

static int
read_args(PyObject *const *args, Py_ssize_t nargs, const char *name, Ctx *c)
{
    if (nargs != 2 && nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 2 or 3 arguments (%zd given)", name, nargs);
        return -1;
    }
    int64_t token_limit = 0;
    if (nargs == 3 && args[2] != Py_None) {
        long long limit = PyLong_AsLongLong(args[2]);
        if (limit == -1 && PyErr_Occurred())
            return -1;
        if (limit < 1) {
            PyErr_Format(PyExc_ValueError, "%s() token_limit must be at least 1", name);
            return -1;
        }
        token_limit = (int64_t)limit;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_Format(PyExc_TypeError, "%s() argument 1 must be bytes, not %.200s", name,
                     Py_TYPE(args[0])->tp_name);
        return -1;
    }
    int want = PyObject_IsTrue(args[1]);
    if (want < 0)
        return -1;
    memset(c, 0, sizeof(*c));
    c->p = (const uchar *)PyBytes_AS_STRING(args[0]);
    c->end = c->p + PyBytes_GET_SIZE(args[0]);
    c->want = want;
    c->token_limit = token_limit;
    return 0;
}

/* None, or MemoryError when the decline came from a failed allocation. */
static PyObject *
decline(Ctx *c)
{
    int nomem = c->nomem;
    ctx_free(c);
    if (nomem)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

PyDoc_STRVAR(canonical_group_doc,
"canonical_group(body: bytes, want_completions: bool, token_limit: int | None = None)\n"
"    -> tuple | None\n"
"\n"
"One /scored_data body as (encoded, size, env_id, policy_versions, completions), or\n"
"None when the body is outside the fast path's domain (see the module docstring).");

static PyObject *
canonical_group(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Ctx c;
    if (read_args(args, nargs, "canonical_group", &c) < 0)
        return NULL;
    c.p = skip_ws(c.p);
    if (parse_group(&c, 1) < 0)
        return decline(&c);
    c.p = skip_ws(c.p);
    if (c.p != c.end)
        return decline(&c);
    PyObject *result = build_result(&c);
    ctx_free(&c);
    return result;
}

PyDoc_STRVAR(canonical_groups_doc,
"canonical_groups(body: bytes, want_completions: bool, token_limit: int | None = None)\n"
"    -> list[tuple] | None\n"
"\n"
"A /scored_data_list body (a JSON array of groups): one canonical_group tuple per\n"
"group, or None when any group is outside the fast path's domain.");

static PyObject *
canonical_groups(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Ctx c;
    if (read_args(args, nargs, "canonical_groups", &c) < 0)
        return NULL;
    c.p = skip_ws(c.p);
    int r = seq_open(&c.p, '[', ']');
    if (r < 0)
        return decline(&c);
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        ctx_free(&c);
        return NULL;
    }
    while (r == 0) {
        ctx_reset(&c);
        if (parse_group(&c, 2) < 0)
            goto declined;
        PyObject *item = build_result(&c);
        if (item == NULL)
            goto error;
        int rc = PyList_Append(list, item);
        Py_DECREF(item);
        if (rc < 0)
            goto error;
        r = seq_next(&c.p, ']');
    }
    if (r < 0)
        goto declined;
    c.p = skip_ws(c.p);
    if (c.p != c.end)
        goto declined;
    ctx_free(&c);
    return list;
declined:
    Py_DECREF(list);
    return decline(&c);
error:
    Py_DECREF(list);
    ctx_free(&c);
    return NULL;
}

static PyMethodDef methods[] = {
    {"canonical_group", (PyCFunction)(void (*)(void))canonical_group, METH_FASTCALL, canonical_group_doc},
    {"canonical_groups", (PyCFunction)(void (*)(void))canonical_groups, METH_FASTCALL, canonical_groups_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "services.gateway.trajectory._scored_fast", MODULE_DOC, -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__scored_fast(void)
{
    for (int i = 0; i < NFIELDS; i++) {
        FIELD_NAME_LENS[i] = (Py_ssize_t)strlen(FIELD_NAMES[i]);
        int len = snprintf(KEY_TEXT[i], sizeof(KEY_TEXT[i]), "%s\"%s\":", i == 0 ? "{" : ",", FIELD_NAMES[i]);
        KEY_TEXT_LENS[i] = len;
    }
    return PyModule_Create(&module_def);
}
