/* geodiag's CPU kernels for fp32 tensors, each one read of the data:
 *   count_fp32    LogHistogram.update: each value's segment from its bit pattern, counted, and the moments and
 *                 extrema of the finite values;
 *   min_max_fp32  the (min, max) NonFiniteProvenance checks every op's output with, NaN if any value is NaN.
 *
 * count_fp32:
 * Why compiled: the same work in torch ops is a chain of full passes (shift, mask, gather, bincount, nan_to_num,
 * sum, dot, min, max), each reading and writing the whole tensor; here each value is read once and the counts stay
 * in L1. The tables come from histogram_bins.fp32_segments, which builds them from the numpy definition that the
 * torch path (any device, any dtype) follows too; the tests hold both to that definition.
 *
 * A value's bits u name its cell u >> 16 (sign, exponent, 7 mantissa bits). For a cell holding at most one cut,
 * offset[cell] makes (u - offset[cell]) >> 16 the segment (histogram_bins explains the trick; the sign bit is folded
 * into the offset). A cell holding more (fp32 subnormals, a threshold next to a bin edge) sends its values to one
 * extra "spill" segment, n_segments; a block that spilled is read again and its spilled values are placed by binary
 * search among the cuts of their sign. The hot loop has no branch.
 *
 * The module takes addresses, not objects: the caller (histograms.py) owns every buffer as a contiguous CPU torch
 * tensor and keeps it alive for the call. No numpy or torch headers are needed to build it.
 */
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

static PyObject *count_fp32(PyObject *self, PyObject *args) {
    unsigned long long values, offset, cuts, source, target, counts, moments, extrema;
    long long n, n_positive, n_cuts, n_segments, n_fold;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "KLKKLLLKKLKKK|p", &values, &n, &offset, &cuts, &n_positive, &n_cuts, &n_segments,
                          &source, &target, &n_fold, &counts, &moments, &extrema, &portable))
        return NULL;
    /* LANES count arrays (+ the spill each), then the segment totals */
    uint32_t *lanes = PyMem_RawCalloc((size_t)(LANES * (n_segments + 1)), sizeof(uint32_t));
    int64_t *segment_total = PyMem_RawCalloc((size_t)n_segments, sizeof(int64_t));
    if (lanes == NULL || segment_total == NULL) {
        PyMem_RawFree(lanes);
        PyMem_RawFree(segment_total);
        return PyErr_NoMemory();
    }
    Tables t = {(const uint32_t *)(uintptr_t)offset, (const uint32_t *)(uintptr_t)cuts, n_positive, n_cuts, n_segments,
                {NULL}};
    for (int k = 0; k < LANES; k++) t.lane[k] = lanes + k * (n_segments + 1);
    const uint32_t *x = (const uint32_t *)(uintptr_t)values;
    Stats stats = {0.0, 0.0, INFINITY, -INFINITY, UINT32_MAX};
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_PATH
    int avx2 = !portable && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    for (int64_t start = 0; start < n; start += BLOCK) {
        int64_t m = n - start < BLOCK ? n - start : BLOCK;
#ifdef HAVE_AVX2_PATH
        if (avx2) {
            count_and_stats_block_avx2(x + start, m, &t, &stats);
        } else
#endif
        {
            count_block(x + start, m, &t);
            stats_block_portable(x + start, m, &stats);
        }
        place_spilled(x + start, m, &t);
    }
    for (int k = 0; k < LANES; k++) /* the caller passes fewer than 2^32 values: no lane count wraps */
        for (int64_t j = 0; j < n_segments; j++) segment_total[j] += t.lane[k][j];
    /* the fold: segment source[j] adds its count to the histogram's count target[j] */
    const int64_t *from = (const int64_t *)(uintptr_t)source, *to = (const int64_t *)(uintptr_t)target;
    int64_t *total = (int64_t *)(uintptr_t)counts;
    for (int64_t j = 0; j < n_fold; j++) total[to[j]] += segment_total[from[j]];
    Py_END_ALLOW_THREADS
    PyMem_RawFree(lanes);
    PyMem_RawFree(segment_total);
    if (n) { /* moments: sum, sum of squares (added); extrema: min, -max, min |x| (each the minimum) */
        double *moment = (double *)(uintptr_t)moments, *extremum = (double *)(uintptr_t)extrema;
        float min_abs;
        uint32_t min_mag = stats.min_mag > INF_BITS ? INF_BITS : stats.min_mag;
        memcpy(&min_abs, &min_mag, sizeof min_abs);
        double seen[3] = {(double)stats.min, -(double)stats.max, (double)min_abs};
        moment[0] += stats.sum;
        moment[1] += stats.sum_sq;
        for (int k = 0; k < 3; k++) extremum[k] = seen[k] < extremum[k] ? seen[k] : extremum[k];
    }
    Py_RETURN_NONE;
}

static PyObject *min_max_fp32(PyObject *self, PyObject *args) {
    unsigned long long values;
    long long n;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "KL|p", &values, &n, &portable)) return NULL;
    const float *x = (const float *)(uintptr_t)values;
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
    return nan ? Py_BuildValue("(dd)", NAN, NAN) : Py_BuildValue("(dd)", (double)min, (double)max);
}

static PyMethodDef methods[] = {
    {"count_fp32", count_fp32, METH_VARARGS,
     "count_fp32(values, n, offset, cuts, n_positive, n_cuts, n_segments, source, target, n_fold, counts, moments, "
     "extrema, portable=False): addresses of contiguous CPU buffers: n fp32 values; the tables (uint32 cell offsets, "
     "the sign folded in; uint32 cuts, the positive side's first; int64 fold map source -> target); a LogHistogram's "
     "int64 counts and float64 moments (added to) and extrema (minimum taken). portable=True: the plain C loops even "
     "where the AVX2 one would run (for the tests)."},
    {"min_max_fp32", min_max_fp32, METH_VARARGS,
     "min_max_fp32(values, n, portable=False) -> (min, max) of n contiguous fp32 values, both NaN if any is NaN "
     "(as torch.aminmax)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&module); }
