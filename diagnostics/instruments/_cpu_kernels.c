/* geodiag's CPU kernels for fp32 tensors, each one read of the data:
 *   count_fp32    LogHistogram.update: each value's segment from its bit pattern, counted, and the moments and
 *                 extrema of the finite values;
 *   min_max_fp32  the (min, max) NonFiniteProvenance checks every op's output with, NaN if any value is NaN.
 *
 * count_fp32:
 * Why compiled: the same work in torch ops is a chain of full passes (shift, mask, gather, bincount, nan_to_num,
 * sum, dot, min, max), each reading and writing the whole tensor; here each value is read once and the counts stay
 * in L1. The tables come from histogram_bins.kernel_tables, which builds them from the numpy definition that the
 * torch path (any device, any dtype) follows too; the tests hold both to that definition.
 *
 * A value's bits u name its cell u >> 16 (sign, exponent, 7 mantissa bits). For a cell holding at most one cut,
 * offset[cell] makes (u - offset[cell]) >> 16 the segment (histogram_bins explains the trick; the sign bit is folded
 * into the offset). A cell holding more (fp32 subnormals, a threshold next to a bin edge) sends its values to one
 * extra "spill" segment, n_segments; a block that spilled is read again and its spilled values are placed by binary
 * search among the cuts of their sign. The hot loop has no branch.
 *
 * Memory safety: every buffer arrives through the buffer protocol, so its length, item format and contiguity are
 * checked here before any value is read (kernels.py checks what C cannot see: that a tensor is on the CPU). The
 * tables are checked once, by make_tables, which copies them into memory of its own: every segment a cell can send
 * a value to, every fold index and the lane allocation are in range by construction, whatever the caller does
 * with its arrays afterwards. No numpy or torch headers are needed to build it.
 *
 * VERSION: kernels.py loads this module only if it equals kernels.KERNEL_VERSION (a stale build after an edit here
 * is not used); bump both with any change to this file.
 */
#define GEODIAG_KERNEL_VERSION 2

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CELL_SHIFT 16
#define MAGNITUDE 0x7fffffffu
#define INF_BITS 0x7f800000u
#define LANES 4          /* separate count arrays: consecutive values in one segment do not wait on each other */
#define BLOCK 16384      /* values per block: counted and summed while in cache; the spill checked after each */

typedef struct {
    double sum, sum_sq; /* of the finite values, non-finite read as 0 */
    float min, max;     /* likewise */
    uint32_t min_mag;   /* smallest magnitude pattern, NaN and Inf included */
} Stats;

static uint32_t place_by_search(uint32_t mag, const uint32_t *cuts, int64_t n_cuts, uint32_t first) {
    int64_t low = 0, high = n_cuts; /* the number of cuts <= mag */
    while (low < high) {
        int64_t middle = (low + high) / 2;
        if (cuts[middle] <= mag) low = middle + 1; else high = middle;
    }
    return first + (uint32_t)low;
}

typedef struct {
    const uint32_t *offset, *cuts;
    int64_t n_positive, n_cuts, n_segments;
    uint32_t *lane[LANES]; /* n_segments + 1 counts each: the last is the spill */
} Tables;

#define SEGMENT(t, u) (((u) - (t)->offset[(u) >> CELL_SHIFT]) >> CELL_SHIFT)

static void count_block(const uint32_t *x, int64_t n, Tables *t) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) t->lane[k][SEGMENT(t, x[i + k])]++;
    for (; i < n; i++) t->lane[0][SEGMENT(t, x[i])]++;
}

/* Values of cells holding several cuts were counted in the spill: place them by search (rare: fp32 subnormals). */
static void place_spilled(const uint32_t *x, int64_t n, Tables *t) {
    uint32_t spilled = 0;
    for (int k = 0; k < LANES; k++) {
        spilled |= t->lane[k][t->n_segments];
        t->lane[k][t->n_segments] = 0;
    }
    if (!spilled) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = x[i], mag = u & MAGNITUDE;
        if (SEGMENT(t, u) != (uint32_t)t->n_segments) continue;
        t->lane[0][(u >> 31) ? place_by_search(mag, t->cuts + t->n_positive, t->n_cuts - t->n_positive,
                                               (uint32_t)t->n_positive + 1)
                             : place_by_search(mag, t->cuts, t->n_positive, 0)]++;
    }
}

static void fold_stats(Stats *stats, double sum, double sum_sq, float min, float max, uint32_t min_mag) {
    stats->sum += sum;
    stats->sum_sq += sum_sq;
    if (min < stats->min) stats->min = min;
    if (max > stats->max) stats->max = max;
    if (min_mag < stats->min_mag) stats->min_mag = min_mag;
}

static void stats_block_portable(const uint32_t *x, int64_t n, Stats *stats) {
    double sum[4] = {0}, sum_sq[4] = {0};
    float min = INFINITY, max = -INFINITY;
    uint32_t min_mag = UINT32_MAX;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = x[i], mag = u & MAGNITUDE, kept = mag < INF_BITS ? u : 0;
        float v;
        memcpy(&v, &kept, sizeof v);
        sum[i % 4] += v;
        sum_sq[i % 4] += (double)v * v;
        min = v < min ? v : min;
        max = v > max ? v : max;
        min_mag = mag < min_mag ? mag : min_mag;
    }
    fold_stats(stats, (sum[0] + sum[1]) + (sum[2] + sum[3]), (sum_sq[0] + sum_sq[1]) + (sum_sq[2] + sum_sq[3]), min,
               max, min_mag);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define HAVE_AVX2_PATH 1
/* min and max in eight-wide registers, a NaN remembered apart (the vector minimum drops it). */
__attribute__((target("avx2"))) static void min_max_avx2(const float *x, int64_t n, float *min, float *max, int *nan) {
    __m256 low[2] = {_mm256_set1_ps(INFINITY), _mm256_set1_ps(INFINITY)};
    __m256 high[2] = {_mm256_set1_ps(-INFINITY), _mm256_set1_ps(-INFINITY)};
    __m256 unordered = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        low[0] = _mm256_min_ps(a, low[0]);
        low[1] = _mm256_min_ps(b, low[1]);
        high[0] = _mm256_max_ps(a, high[0]);
        high[1] = _mm256_max_ps(b, high[1]);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(a, b, _CMP_UNORD_Q));
    }
    float lo[8], hi[8], un[8];
    _mm256_storeu_ps(lo, _mm256_min_ps(low[0], low[1]));
    _mm256_storeu_ps(hi, _mm256_max_ps(high[0], high[1]));
    _mm256_storeu_ps(un, unordered);
    for (int k = 0; k < 8; k++) {
        *min = lo[k] < *min ? lo[k] : *min;
        *max = hi[k] > *max ? hi[k] : *max;
        *nan |= un[k] != 0.0f;
    }
    for (; i < n; i++) {
        *min = x[i] < *min ? x[i] : *min;
        *max = x[i] > *max ? x[i] : *max;
        *nan |= x[i] != x[i];
    }
}

/* Counting and summing in one loop, 16 values per step: the counts keep the load ports busy and the sums (four
 * fp64 accumulators per moment) the vector units, so the two overlap. The tail goes to the portable code. */
__attribute__((target("avx2,fma"))) static void count_and_stats_block_avx2(const uint32_t *x, int64_t n, Tables *t,
                                                                           Stats *stats) {
    __m256d sum[4], sum_sq[4];
    for (int k = 0; k < 4; k++) sum[k] = sum_sq[k] = _mm256_setzero_pd();
    __m256 min = _mm256_set1_ps(INFINITY), max = _mm256_set1_ps(-INFINITY);
    const __m256i magnitude = _mm256_set1_epi32((int)MAGNITUDE), inf = _mm256_set1_epi32((int)INF_BITS);
    __m256i min_mag = magnitude; /* magnitudes are < 2^31, so signed minima order them */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int k = 0; k < 16; k++) t->lane[k % LANES][SEGMENT(t, x[i + k])]++;
        __m256i u[2] = {_mm256_loadu_si256((const __m256i *)(x + i)), _mm256_loadu_si256((const __m256i *)(x + i + 8))};
        for (int h = 0; h < 2; h++) {
            __m256i mag = _mm256_and_si256(u[h], magnitude);
            min_mag = _mm256_min_epi32(min_mag, mag);
            __m256 v = _mm256_castsi256_ps(_mm256_and_si256(u[h], _mm256_cmpgt_epi32(inf, mag)));
            min = _mm256_min_ps(v, min);
            max = _mm256_max_ps(v, max);
            __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
            sum[2 * h] = _mm256_add_pd(sum[2 * h], low);
            sum[2 * h + 1] = _mm256_add_pd(sum[2 * h + 1], high);
            sum_sq[2 * h] = _mm256_fmadd_pd(low, low, sum_sq[2 * h]);
            sum_sq[2 * h + 1] = _mm256_fmadd_pd(high, high, sum_sq[2 * h + 1]);
        }
    }
    double s[4], q[4];
    float lo[8], hi[8];
    uint32_t mags[8];
    _mm256_storeu_pd(s, _mm256_add_pd(_mm256_add_pd(sum[0], sum[1]), _mm256_add_pd(sum[2], sum[3])));
    _mm256_storeu_pd(q, _mm256_add_pd(_mm256_add_pd(sum_sq[0], sum_sq[1]), _mm256_add_pd(sum_sq[2], sum_sq[3])));
    _mm256_storeu_ps(lo, min);
    _mm256_storeu_ps(hi, max);
    _mm256_storeu_si256((__m256i *)mags, min_mag);
    for (int k = 0; k < 8; k++) fold_stats(stats, k < 4 ? s[k] : 0.0, k < 4 ? q[k] : 0.0, lo[k], hi[k], mags[k]);
    count_block(x + i, n - i, t);
    stats_block_portable(x + i, n - i, stats);
}
#endif

/* ------------------------------------------------------------------ arguments, checked */
#define CELLS (1L << 16)            /* u >> CELL_SHIFT of every 32-bit pattern: the offset table has one per cell */
#define MAX_VALUES (1LL << 31)      /* per count_fp32 call: no uint32 lane count wraps */
#define TABLES_NAME "geodiag._cpu_kernels.tables"

/* A C-contiguous buffer of one item format (one of `formats`, `itemsize` bytes each), writable if asked; its number of
 * items in *count. On failure a one-line TypeError naming the argument, and nothing is held. */
static int get_buffer(PyObject *object, const char *name, const char *formats, Py_ssize_t itemsize, int writable,
                      Py_buffer *view, Py_ssize_t *count) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer, got %.80s", name,
                     writable ? ", writable" : "", Py_TYPE(object)->tp_name);
        return -1;
    }
    const char *format = view->format ? view->format : "B";
    const char *code = format + (format[0] == '@' || format[0] == '=' || (PY_LITTLE_ENDIAN && format[0] == '<'));
    if (view->itemsize != itemsize || code[0] == '\0' || code[1] != '\0' || strchr(formats, code[0]) == NULL) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of format '%s' (%zd bytes), got '%s' (%zd bytes)", name,
                     formats, itemsize, format, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    *count = view->len / itemsize;
    return 0;
}

typedef struct {
    uint32_t offset[CELLS];
    uint32_t *cuts;            /* the positive side's n_positive, then the negative side's */
    int64_t *source, *target;  /* the fold: segment source[j] adds its count to counts[target[j]] */
    int64_t n_positive, n_cuts, n_segments, n_fold;
    int64_t n_counts;          /* the counts buffer must hold at least this many: the largest target + 1 */
} OwnedTables;

static void free_tables(PyObject *capsule) {
    OwnedTables *owned = PyCapsule_GetPointer(capsule, TABLES_NAME);
    if (owned == NULL) return;
    PyMem_RawFree(owned->cuts);
    PyMem_RawFree(owned->source);
    PyMem_RawFree(owned->target);
    PyMem_RawFree(owned);
}

/* The first cell (or -1) whose values could be sent outside segments 0 .. n_segments (the last is the spill):
 * a cell's patterns give (u - offset) mod 2^32 over 2^16 consecutive numbers, which must not wrap. */
static int64_t cell_out_of_range(const OwnedTables *t) {
    for (int64_t cell = 0; cell < CELLS; cell++) {
        uint32_t low = (uint32_t)(cell << CELL_SHIFT) - t->offset[cell];
        if (low > UINT32_MAX - 0xffffu || (int64_t)((low + 0xffffu) >> CELL_SHIFT) > t->n_segments) return cell;
    }
    return -1;
}

/* The fold's first bad index (or -1): a source outside the segments or a negative target; sets n_counts. */
static int64_t fold_out_of_range(OwnedTables *t) {
    t->n_counts = 0;
    for (int64_t j = 0; j < t->n_fold; j++) {
        if (t->source[j] < 0 || t->source[j] >= t->n_segments || t->target[j] < 0) return j;
        if (t->target[j] >= t->n_counts) t->n_counts = t->target[j] + 1;
    }
    return -1;
}

static int copy_into(void **to, const Py_buffer *view) {
    *to = PyMem_RawMalloc(view->len ? (size_t)view->len : 1);
    if (*to == NULL) return -1;
    memcpy(*to, view->buf, (size_t)view->len);
    return 0;
}

/* Each sign has one segment more than its cuts; the copies are checked, not the caller's arrays. */
static PyObject *checked_tables(OwnedTables *t, Py_buffer *views, Py_ssize_t n_fold) {
    memcpy(t->offset, views[0].buf, sizeof t->offset);
    t->n_cuts = views[1].len / 4;
    t->n_segments = t->n_cuts + 2;
    t->n_fold = n_fold;
    if (copy_into((void **)&t->cuts, &views[1]) < 0 || copy_into((void **)&t->source, &views[2]) < 0 ||
        copy_into((void **)&t->target, &views[3]) < 0)
        return PyErr_NoMemory();
    int64_t cell = cell_out_of_range(t), j = fold_out_of_range(t);
    if (cell >= 0)
        return PyErr_Format(PyExc_ValueError, "offset: cell %lld sends values beyond the %lld segments", (long long)cell,
                            (long long)t->n_segments);
    if (j >= 0)
        return PyErr_Format(PyExc_ValueError, "source/target: entry %lld maps segment %lld to count %lld; the "
                            "segments are 0..%lld, the counts from 0", (long long)j, (long long)t->source[j],
                            (long long)t->target[j], (long long)t->n_segments - 1);
    return PyCapsule_New(t, TABLES_NAME, free_tables);
}

static PyObject *make_tables(PyObject *self, PyObject *args) {
    PyObject *objects[4];
    long long n_positive;
    if (!PyArg_ParseTuple(args, "OOLOO", &objects[0], &objects[1], &n_positive, &objects[2], &objects[3]))
        return NULL;
    static const char *names[4] = {"offset", "cuts", "source", "target"}, *formats[4] = {"I", "I", "lq", "lq"};
    static const Py_ssize_t sizes[4] = {4, 4, 8, 8};
    Py_buffer views[4];
    Py_ssize_t counts[4];
    int held = 0;
    PyObject *result = NULL;
    OwnedTables *owned = NULL;
    for (; held < 4; held++)
        if (get_buffer(objects[held], names[held], formats[held], sizes[held], 0, &views[held], &counts[held]) < 0)
            goto done;
    if (counts[0] != CELLS) {
        PyErr_Format(PyExc_ValueError, "offset: %zd cells, expected %ld", counts[0], CELLS);
    } else if (n_positive < 0 || n_positive > counts[1] || counts[1] > (Py_ssize_t)UINT32_MAX - 2) {
        PyErr_Format(PyExc_ValueError, "n_positive: %lld is not within the %zd cuts", n_positive, counts[1]);
    } else if (counts[2] != counts[3]) {
        PyErr_Format(PyExc_ValueError, "source and target: %zd and %zd entries, expected as many", counts[2],
                     counts[3]);
    } else if ((owned = PyMem_RawCalloc(1, sizeof *owned)) == NULL) {
        PyErr_NoMemory();
    } else {
        owned->n_positive = n_positive;
        result = checked_tables(owned, views, counts[2]);
    }
done:
    if (result == NULL && owned != NULL) {
        PyMem_RawFree(owned->cuts);
        PyMem_RawFree(owned->source);
        PyMem_RawFree(owned->target);
        PyMem_RawFree(owned);
    }
    while (held > 0) PyBuffer_Release(&views[--held]);
    return result;
}

/* ------------------------------------------------------------------ the calls */
static void count_values(const uint32_t *x, int64_t n, const OwnedTables *owned, uint32_t *lanes,
                         int64_t *segment_total, Stats *stats, int portable) {
    Tables t = {owned->offset, owned->cuts, owned->n_positive, owned->n_cuts, owned->n_segments, {NULL}};
    for (int k = 0; k < LANES; k++) t.lane[k] = lanes + k * (owned->n_segments + 1);
#ifdef HAVE_AVX2_PATH
    int avx2 = !portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
#ifdef HAVE_AVX2_PATH
        if (avx2) {
            count_and_stats_block_avx2(x + start, m, &t, stats);
        } else
#endif
        {
            count_block(x + start, m, &t);
            stats_block_portable(x + start, m, stats);
        }
        place_spilled(x + start, m, &t);
    }
    for (int k = 0; k < LANES; k++) /* at most MAX_VALUES values: no lane count wraps */
        for (int64_t j = 0; j < owned->n_segments; j++) segment_total[j] += t.lane[k][j];
}

/* moments: sum, sum of squares (added); extrema: min, -max, min |x| (each the minimum) */
static void fold_into(const OwnedTables *owned, const int64_t *segment_total, const Stats *stats, int64_t n,
                      int64_t *counts, double *moment, double *extremum) {
    for (int64_t j = 0; j < owned->n_fold; j++) counts[owned->target[j]] += segment_total[owned->source[j]];
    if (!n) return;
    float min_abs;
    uint32_t min_mag = stats->min_mag > INF_BITS ? INF_BITS : stats->min_mag;
    memcpy(&min_abs, &min_mag, sizeof min_abs);
    double seen[3] = {(double)stats->min, -(double)stats->max, (double)min_abs};
    moment[0] += stats->sum;
    moment[1] += stats->sum_sq;
    for (int k = 0; k < 3; k++) extremum[k] = seen[k] < extremum[k] ? seen[k] : extremum[k];
}

static PyObject *count_fp32(PyObject *self, PyObject *args) {
    PyObject *values, *tables, *outputs[3];
    int portable = 0;
    if (!PyArg_ParseTuple(args, "OOOOO|p", &values, &tables, &outputs[0], &outputs[1], &outputs[2], &portable))
        return NULL;
    const OwnedTables *owned = PyCapsule_GetPointer(tables, TABLES_NAME);
    if (owned == NULL) {
        PyErr_Clear();
        return PyErr_Format(PyExc_TypeError, "tables: expected what make_tables returns, got %.80s",
                            Py_TYPE(tables)->tp_name);
    }
    static const char *names[4] = {"values", "counts", "moments", "extrema"}, *formats[4] = {"f", "lq", "d", "d"};
    static const Py_ssize_t sizes[4] = {4, 8, 8, 8};
    PyObject *objects[4] = {values, outputs[0], outputs[1], outputs[2]};
    Py_buffer views[4];
    Py_ssize_t counts[4];
    int held = 0;
    PyObject *result = NULL;
    for (; held < 4; held++)
        if (get_buffer(objects[held], names[held], formats[held], sizes[held], held > 0, &views[held],
                       &counts[held]) < 0)
            goto done;
    if (counts[0] > MAX_VALUES) {
        PyErr_Format(PyExc_ValueError, "values: %zd in one call, at most %lld", counts[0], MAX_VALUES);
    } else if (counts[1] < owned->n_counts || counts[2] != 2 || counts[3] != 3) {
        PyErr_Format(PyExc_ValueError, "counts, moments, extrema: %zd, %zd and %zd entries, expected at least %lld, "
                     "2 and 3", counts[1], counts[2], counts[3], (long long)owned->n_counts);
    } else {
        /* LANES count arrays (+ the spill each), then the segment totals */
        uint32_t *lanes = PyMem_RawCalloc((size_t)(LANES * (owned->n_segments + 1)), sizeof(uint32_t));
        int64_t *segment_total = PyMem_RawCalloc((size_t)owned->n_segments, sizeof(int64_t));
        if (lanes == NULL || segment_total == NULL) {
            PyErr_NoMemory();
        } else {
            Stats stats = {0.0, 0.0, INFINITY, -INFINITY, UINT32_MAX};
            Py_BEGIN_ALLOW_THREADS
            count_values(views[0].buf, counts[0], owned, lanes, segment_total, &stats, portable);
            fold_into(owned, segment_total, &stats, counts[0], views[1].buf, views[2].buf, views[3].buf);
            Py_END_ALLOW_THREADS
            result = Py_NewRef(Py_None);
        }
        PyMem_RawFree(lanes);
        PyMem_RawFree(segment_total);
    }
done:
    while (held > 0) PyBuffer_Release(&views[--held]);
    return result;
}

static PyObject *min_max_fp32(PyObject *self, PyObject *args) {
    PyObject *values;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "O|p", &values, &portable)) return NULL;
    Py_buffer view;
    Py_ssize_t n;
    if (get_buffer(values, "values", "f", 4, 0, &view, &n) < 0) return NULL;
    const float *x = view.buf;
    float min = INFINITY, max = -INFINITY;
    int nan = 0;
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
    if (!portable && __builtin_cpu_supports("avx2")) min_max_avx2(x, n, &min, &max, &nan); else
#endif
    for (int64_t i = 0; i < n; i++) {
        min = x[i] < min ? x[i] : min;
        max = x[i] > max ? x[i] : max;
        nan |= x[i] != x[i];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (!n) Py_RETURN_NONE; /* no values, no extrema */
    return nan ? Py_BuildValue("(dd)", NAN, NAN) : Py_BuildValue("(dd)", (double)min, (double)max);
}

static PyMethodDef methods[] = {
    {"make_tables", make_tables, METH_VARARGS,
     "make_tables(offset, cuts, n_positive, source, target) -> tables for count_fp32: uint32 cell offsets (65536, the "
     "sign folded in), uint32 cuts (the positive side's n_positive first), the int64 fold map source -> target. "
     "Copied and checked: ValueError if a cell or the fold could index out of range."},
    {"count_fp32", count_fp32, METH_VARARGS,
     "count_fp32(values, tables, counts, moments, extrema, portable=False): contiguous buffers: at most MAX_VALUES "
     "float32 values; a LogHistogram's int64 counts (at least as many as the tables fold into) and float64 moments (2, "
     "added to) and extrema (3, minimum taken). portable=True: the plain C loops even where the AVX2 one would run "
     "(for the tests)."},
    {"min_max_fp32", min_max_fp32, METH_VARARGS,
     "min_max_fp32(values, portable=False) -> (min, max) of a contiguous float32 buffer, both NaN if any is NaN (as "
     "torch.aminmax); None if it is empty."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

static int add_long_long(PyObject *to, const char *name, long long value) {
    PyObject *number = PyLong_FromLongLong(value);
    int status = number == NULL ? -1 : PyModule_AddObjectRef(to, name, number);
    Py_XDECREF(number);
    return status;
}

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
    PyObject *created = PyModule_Create(&module);
    if (created == NULL) return NULL;
    if (PyModule_AddIntConstant(created, "VERSION", GEODIAG_KERNEL_VERSION) < 0 ||
        add_long_long(created, "MAX_VALUES", MAX_VALUES) < 0) {
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
