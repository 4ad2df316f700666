/* geodiag's CPU kernels for fp32 tensors, each one read of the data: count_fp32 (LogHistogram.update: each value's
 * segment from its bit pattern, counted, and the moments and extrema of the finite values) and min_max_fp32 (the
 * (min, max) NonFiniteProvenance checks every op's output with, NaN if any value is NaN).
 *
 * Why count_fp32 is compiled: the same work in torch ops is a chain of full passes (shift, mask, gather, bincount,
 * nan_to_num, sum, dot, min, max), each reading and writing the whole tensor; here each value is read once and the
 * counts stay in L1. The tables come from histogram_bins.kernel_tables, which builds them from the numpy definition
 * that the torch path (any device, any dtype) follows too; the tests hold both to that definition.
 *
 * A value's bits u name its cell u >> 16 (sign, exponent, 7 mantissa bits). For a cell holding at most one cut,
 * offset[cell] makes (u - offset[cell]) >> 16 the segment (histogram_bins explains the trick; the sign bit is folded
 * into the offset). A cell holding more (fp32 subnormals, a threshold next to a bin edge) sends its values to one
 * extra "spill" segment, n_segments; a block that spilled is read again and its spilled values are placed by binary
 * search among the cuts of their sign. The hot loop has no branch.
 *
 * Safety: every buffer comes through the buffer protocol; its length, item format and contiguity are checked
 * before any value is read (kernels.py checks what C cannot see: that a tensor is on the CPU). make_tables checks
 * the tables once and copies them: every segment and fold index is then in range, whatever the caller does with its
 * arrays. No numpy or torch headers are needed to build it.
 */
#define GEODIAG_KERNEL_VERSION 2 /* kernels.py loads only a build of its KERNEL_VERSION: bump both with any change */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define CELL_SHIFT 16
#define MAGNITUDE 0x7fffffffu
#define INF_BITS 0x7f800000u
#define LANES 4          /* separate count arrays: consecutive values in one segment do not wait on each other */
#define CELLS (1L << 16)  /* of 2^16 patterns each */
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

/* The tables, copied by make_tables into one allocation of the module's: checked once, they cannot change later. */
typedef struct {
    int64_t n_positive, n_cuts, n_segments, n_fold;
    int64_t n_counts;          /* the counts buffer must hold at least this many: the largest target + 1 */
    int64_t *source, *target;  /* the fold: segment source[j] adds its count to counts[target[j]] */
    uint32_t *cuts;            /* the positive side's n_positive, then the negative side's */
    uint32_t offset[CELLS];    /* per cell u >> CELL_SHIFT */
} Tables;

typedef uint32_t *Lanes[LANES]; /* n_segments + 1 counts each: the last is the spill */

#define SEGMENT(t, u) (((u) - (t)->offset[(u) >> CELL_SHIFT]) >> CELL_SHIFT)

static void count_block(const uint32_t *x, int64_t n, const Tables *t, Lanes lane) {
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int k = 0; k < LANES; k++) lane[k][SEGMENT(t, x[i + k])]++;
    for (; i < n; i++) lane[0][SEGMENT(t, x[i])]++;
}

/* Values of cells holding several cuts were counted in the spill: place them by search (rare: fp32 subnormals). */
static void place_spilled(const uint32_t *x, int64_t n, const Tables *t, Lanes lane) {
    uint32_t spilled = 0;
    for (int k = 0; k < LANES; k++) {
        spilled |= lane[k][t->n_segments];
        lane[k][t->n_segments] = 0;
    }
    if (!spilled) return;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = x[i], mag = u & MAGNITUDE;
        if (SEGMENT(t, u) != (uint32_t)t->n_segments) continue;
        lane[0][(u >> 31) ? place_by_search(mag, t->cuts + t->n_positive, t->n_cuts - t->n_positive,
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

static void count_and_stats_block_portable(const uint32_t *x, int64_t n, const Tables *t, Lanes lane, Stats *stats) {
    count_block(x, n, t, lane);
    stats_block_portable(x, n, stats);
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
__attribute__((target("avx2,fma"))) static void count_and_stats_block_avx2(const uint32_t *x, int64_t n,
                                                                           const Tables *t, Lanes lane, Stats *stats) {
    __m256d sum[4], sum_sq[4];
    for (int k = 0; k < 4; k++) sum[k] = sum_sq[k] = _mm256_setzero_pd();
    __m256 min = _mm256_set1_ps(INFINITY), max = _mm256_set1_ps(-INFINITY);
    const __m256i magnitude = _mm256_set1_epi32((int)MAGNITUDE), inf = _mm256_set1_epi32((int)INF_BITS);
    __m256i min_mag = magnitude; /* magnitudes are < 2^31, so signed minima order them */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int k = 0; k < 16; k++) lane[k % LANES][SEGMENT(t, x[i + k])]++;
        __m256i u[2] = {_mm256_loadu_si256((const __m256i *)(x + i)), _mm256_loadu_si256((const __m256i *)(x + i + 8))};
        for (int h = 0; h < 2; h++) {
            __m256i mag = _mm256_and_si256(u[h], magnitude);
            min_mag = _mm256_min_epi32(min_mag, mag);
            __m256 v = _mm256_castsi256_ps(_mm256_and_si256(u[h], _mm256_cmpgt_epi32(inf, mag)));
            min = _mm256_min_ps(v, min);
            max = _mm256_max_ps(v, max);
            __m256d low = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
            __m256d high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
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
    count_and_stats_block_portable(x + i, n - i, t, lane, stats);
}
#endif

#define MAX_VALUES 0x7fffffffL      /* per count_fp32 call: no uint32 lane count wraps */
#define TABLES_NAME "geodiag._cpu_kernels.tables"

/* get_buffer: a C-contiguous buffer of the spec's items (formats: the struct-module codes accepted), its number of
 * items in *count; else a one-line TypeError naming the argument, and nothing held. get_buffers: all, or none. */
typedef struct { const char *name, *formats; Py_ssize_t itemsize; int writable; } BufferSpec;
static int get_buffer(PyObject *object, const BufferSpec *spec, Py_buffer *view, Py_ssize_t *count) {
    if (PyObject_GetBuffer(object, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (spec->writable ? PyBUF_WRITABLE : 0))) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a C-contiguous%s buffer, got %.80s", spec->name,
                     spec->writable ? ", writable" : "", Py_TYPE(object)->tp_name);
        return -1;
    }
    const char *format = view->format ? view->format : "B";
    const char *code = format + (format[0] == '@' || format[0] == '=' || (PY_LITTLE_ENDIAN && format[0] == '<'));
    if (view->itemsize != spec->itemsize || !code[0] || code[1] || !strchr(spec->formats, code[0])) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of format '%s' (%zd bytes), got '%s' (%zd bytes)",
                     spec->name, spec->formats, spec->itemsize, format, view->itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    *count = view->len / spec->itemsize;
    return 0;
}

static int get_buffers(PyObject **objects, const BufferSpec *specs, int n, Py_buffer *views, Py_ssize_t *counts) {
    for (int i = 0; i < n; i++)
        if (get_buffer(objects[i], &specs[i], &views[i], &counts[i]) < 0) {
            while (i > 0) PyBuffer_Release(&views[--i]);
            return -1;
        }
    return 0;
}

static void free_tables(PyObject *capsule) { PyMem_RawFree(PyCapsule_GetPointer(capsule, TABLES_NAME)); }

/* A one-line ValueError if a cell could send values outside segments 0 .. n_segments (the last is the spill: a cell's
 * patterns give (u - offset) mod 2^32 over 2^16 consecutive numbers, which must not wrap), or if the fold reads
 * outside the segments or writes below 0; sets n_counts. */
static int check_tables(Tables *t) {
    for (int64_t cell = 0; cell < CELLS; cell++) {
        uint32_t low = (uint32_t)(cell << CELL_SHIFT) - t->offset[cell];
        if (low > UINT32_MAX - 0xffffu || (int64_t)((low + 0xffffu) >> CELL_SHIFT) > t->n_segments) {
            PyErr_Format(PyExc_ValueError, "offset: cell %lld sends values beyond the %lld segments", (long long)cell,
                         (long long)t->n_segments);
            return -1;
        }
    }
    for (int64_t j = 0; j < t->n_fold; j++) {
        if (t->source[j] < 0 || t->source[j] >= t->n_segments || t->target[j] < 0) {
            PyErr_Format(PyExc_ValueError, "source/target: entry %lld maps segment %lld to count %lld; the segments "
                         "are 0..%lld, the counts from 0", (long long)j, (long long)t->source[j],
                         (long long)t->target[j], (long long)t->n_segments - 1);
            return -1;
        }
        if (t->target[j] >= t->n_counts) t->n_counts = t->target[j] + 1;
    }
    return 0;
}

/* Each sign has one segment more than its cuts. The copy is checked, not the caller's arrays. */
static PyObject *owned_tables(const Py_buffer *views, int64_t n_positive) {
    int64_t n_cuts = views[1].len / 4, n_fold = views[2].len / 8;
    Tables *t = PyMem_RawCalloc(1, sizeof(Tables) + (size_t)(16 * n_fold + 4 * n_cuts));
    if (t == NULL) return PyErr_NoMemory();
    t->n_positive = n_positive, t->n_cuts = n_cuts, t->n_segments = n_cuts + 2, t->n_fold = n_fold;
    t->source = (int64_t *)(t + 1), t->target = t->source + n_fold, t->cuts = (uint32_t *)(t->target + n_fold);
    memcpy(t->offset, views[0].buf, sizeof t->offset);
    memcpy(t->cuts, views[1].buf, (size_t)views[1].len);
    memcpy(t->source, views[2].buf, (size_t)views[2].len);
    memcpy(t->target, views[3].buf, (size_t)views[3].len);
    PyObject *capsule = check_tables(t) < 0 ? NULL : PyCapsule_New(t, TABLES_NAME, free_tables);
    if (capsule == NULL) PyMem_RawFree(t);
    return capsule;
}

static PyObject *make_tables(PyObject *self, PyObject *args) {
    static const BufferSpec specs[4] = {{"offset", "I", 4, 0}, {"cuts", "I", 4, 0}, {"source", "lq", 8, 0},
                                        {"target", "lq", 8, 0}};
    PyObject *objects[4];
    long long n_positive;
    Py_buffer views[4];
    Py_ssize_t counts[4]; /* the items of each view */
    if (!PyArg_ParseTuple(args, "OOLOO", &objects[0], &objects[1], &n_positive, &objects[2], &objects[3]) ||
        get_buffers(objects, specs, 4, views, counts) < 0)
        return NULL;
    PyObject *result = NULL;
    if (counts[0] != CELLS)
        PyErr_Format(PyExc_ValueError, "offset: %zd cells, expected %ld", counts[0], CELLS);
    else if (n_positive < 0 || n_positive > counts[1] || counts[1] > (Py_ssize_t)UINT32_MAX - 2)
        PyErr_Format(PyExc_ValueError, "n_positive: %lld is not within the %zd cuts", n_positive, counts[1]);
    else if (counts[2] != counts[3])
        PyErr_Format(PyExc_ValueError, "source and target: %zd and %zd entries, expected as many", counts[2],
                     counts[3]);
    else
        result = owned_tables(views, n_positive);
    for (int i = 0; i < 4; i++) PyBuffer_Release(&views[i]);
    return result;
}

/* Counted into `lanes` (LANES count arrays of n_segments + 1, then the int64 segment totals), then folded: counts
 * (added to); moments: sum, sum of squares (added); extrema: min, -max, min |x| (each the minimum). */
static void count_values(const uint32_t *x, int64_t n, const Tables *t, uint32_t *lanes, int portable,
                         int64_t *counts, double *moment, double *extremum) {
    int64_t *segment_total = (int64_t *)(lanes + LANES * (t->n_segments + 1)); /* 8-byte aligned: LANES is 4 */
    Stats stats = {0.0, 0.0, INFINITY, -INFINITY, UINT32_MAX};
    Lanes lane;
    for (int k = 0; k < LANES; k++) lane[k] = lanes + k * (t->n_segments + 1);
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
#ifdef HAVE_AVX2_PATH
        if (!portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            count_and_stats_block_avx2(x + start, m, t, lane, &stats);
        else
#endif
        count_and_stats_block_portable(x + start, m, t, lane, &stats);
        place_spilled(x + start, m, t, lane);
    }
    for (int k = 0; k < LANES; k++) /* at most MAX_VALUES values: no lane count wraps */
        for (int64_t j = 0; j < t->n_segments; j++) segment_total[j] += lane[k][j];
    for (int64_t j = 0; j < t->n_fold; j++) counts[t->target[j]] += segment_total[t->source[j]];
    if (!n) return;
    float min_abs;
    uint32_t min_mag = stats.min_mag > INF_BITS ? INF_BITS : stats.min_mag;
    memcpy(&min_abs, &min_mag, sizeof min_abs);
    double seen[3] = {(double)stats.min, -(double)stats.max, (double)min_abs};
    moment[0] += stats.sum;
    moment[1] += stats.sum_sq;
    for (int k = 0; k < 3; k++) extremum[k] = seen[k] < extremum[k] ? seen[k] : extremum[k];
}

static PyObject *count_fp32(PyObject *self, PyObject *args) {
    static const BufferSpec specs[4] = {{"values", "f", 4, 0}, {"counts", "lq", 8, 1}, {"moments", "d", 8, 1},
                                        {"extrema", "d", 8, 1}};
    PyObject *objects[4], *tables;
    int portable = 0;
    Py_buffer views[4];
    Py_ssize_t counts[4]; /* the items of each view */
    if (!PyArg_ParseTuple(args, "OO!OOO|p", &objects[0], &PyCapsule_Type, &tables, &objects[1], &objects[2],
                          &objects[3], &portable))
        return NULL;
    const Tables *owned = PyCapsule_GetPointer(tables, TABLES_NAME); /* a ValueError for another capsule */
    if (owned == NULL || get_buffers(objects, specs, 4, views, counts) < 0) return NULL;
    PyObject *result = NULL;
    uint32_t *lanes = PyMem_RawCalloc((size_t)(owned->n_segments + 1), LANES * sizeof(uint32_t) + sizeof(int64_t));
    if (counts[0] > MAX_VALUES) {
        PyErr_Format(PyExc_ValueError, "values: %zd in one call, at most %ld", counts[0], MAX_VALUES);
    } else if (counts[1] < owned->n_counts || counts[2] != 2 || counts[3] != 3) {
        PyErr_Format(PyExc_ValueError, "counts, moments, extrema: %zd, %zd and %zd entries, expected at least %lld, "
                     "2 and 3", counts[1], counts[2], counts[3], (long long)owned->n_counts);
    } else if (lanes == NULL) {
        PyErr_NoMemory();
    } else {
        Py_BEGIN_ALLOW_THREADS
        count_values(views[0].buf, counts[0], owned, lanes, portable, views[1].buf, views[2].buf, views[3].buf);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyMem_RawFree(lanes);
    for (int i = 0; i < 4; i++) PyBuffer_Release(&views[i]);
    return result;
}

static PyObject *min_max_fp32(PyObject *self, PyObject *args) {
    PyObject *values;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "O|p", &values, &portable)) return NULL;
    Py_buffer view;
    Py_ssize_t n;
    if (get_buffer(values, &(BufferSpec){"values", "f", 4, 0}, &view, &n) < 0) return NULL;
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
    {"make_tables", make_tables, METH_VARARGS, "make_tables(offset, cuts, n_positive, source, target): checked copy."},
    {"count_fp32", count_fp32, METH_VARARGS, "count_fp32(values, tables, counts, moments, extrema, portable=False): "
     "at most MAX_VALUES float32 values into a LogHistogram's int64 counts, float64 moments (2) and extrema (3); "
     "portable=True: the plain C loops even where AVX2 would run (for the tests)."},
    {"min_max_fp32", min_max_fp32, METH_VARARGS, "min_max_fp32(values, portable=False) -> (min, max) of float32 "
     "values, both NaN if any is NaN (as torch.aminmax); None if there are none."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) {
    PyObject *created = PyModule_Create(&module);
    if (created && (PyModule_AddIntConstant(created, "VERSION", GEODIAG_KERNEL_VERSION) < 0 ||
                    PyModule_AddIntConstant(created, "MAX_VALUES", MAX_VALUES) < 0))
        Py_CLEAR(created);
    return created;
}
