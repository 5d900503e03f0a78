// Calibration binning on the GPU, where the TensorRT calibration forward leaves the activations
// (pipeline/runtime/cuda_binning.py loads the PTX compiled from this file; `make ptx` rebuilds it).
//
// The arithmetic is calibration/kernels.py's edge-table form: a value's bin is the number of
// threshold-table entries T[k] <= |x| (or max(x, 0)), T the float32 edges the CPU computed with
// its float64 division. Comparisons of float32 values and integer additions only: nothing
// rounds, so the counts are the CPU kernels' counts, bit for bit.

#define BLOCK 256

// Per-block (min, max, NaN count) of n float32 values; the host reduces the blocks' partials.
extern "C" __global__ void range_f32(const float* __restrict__ x, unsigned long long n,
                                     float* __restrict__ lo_out, float* __restrict__ hi_out,
                                     unsigned int* __restrict__ nan_out)
{
    __shared__ float s_lo[BLOCK];
    __shared__ float s_hi[BLOCK];
    __shared__ unsigned int s_nan[BLOCK];
    float lo = __int_as_float(0x7f800000);   // +inf
    float hi = __int_as_float(0xff800000);   // -inf
    unsigned int nans = 0;
    unsigned long long stride = (unsigned long long)gridDim.x * BLOCK;
    for (unsigned long long i = (unsigned long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        float v = x[i];
        if (v != v) {
            nans += 1;
        } else {
            lo = fminf(lo, v);
            hi = fmaxf(hi, v);
        }
    }
    s_lo[threadIdx.x] = lo;
    s_hi[threadIdx.x] = hi;
    s_nan[threadIdx.x] = nans;
    __syncthreads();
    for (int half = BLOCK / 2; half > 0; half >>= 1) {
        if (threadIdx.x < half) {
            s_lo[threadIdx.x] = fminf(s_lo[threadIdx.x], s_lo[threadIdx.x + half]);
            s_hi[threadIdx.x] = fmaxf(s_hi[threadIdx.x], s_hi[threadIdx.x + half]);
            s_nan[threadIdx.x] += s_nan[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        lo_out[blockIdx.x] = s_lo[0];
        hi_out[blockIdx.x] = s_hi[0];
        nan_out[blockIdx.x] = s_nan[0];
    }
}

// The bin of v: how many of the num_bins - 1 sorted thresholds t[k] are <= v (numpy's
// searchsorted(t, v, side="right")), in [0, num_bins - 1].
__device__ __forceinline__ int bin_of(const float* t, int num_bins, float v)
{
    int lo = 0, hi = num_bins - 1;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (t[mid] <= v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Counts of n float32 values into num_bins bins, per block in shared memory (num_bins 32-bit
// counters, then the num_bins - 1 thresholds), added to the 64-bit counts at the end. The host
// launches at most n / 2^31 values per block, so a block's counter cannot wrap.
extern "C" __global__ void bin_f32_shared(const float* __restrict__ x, unsigned long long n,
                                          const float* __restrict__ table, int num_bins, int positive,
                                          unsigned long long* __restrict__ counts)
{
    extern __shared__ unsigned int smem[];
    unsigned int* c = smem;
    float* t = (float*)(smem + num_bins);
    for (int k = threadIdx.x; k < num_bins; k += BLOCK) c[k] = 0;
    for (int k = threadIdx.x; k < num_bins - 1; k += BLOCK) t[k] = table[k];
    __syncthreads();
    unsigned long long stride = (unsigned long long)gridDim.x * BLOCK;
    for (unsigned long long i = (unsigned long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        float v = x[i];
        v = positive ? fmaxf(v, 0.0f) : fabsf(v);
        atomicAdd(&c[bin_of(t, num_bins, v)], 1u);
    }
    __syncthreads();
    for (int k = threadIdx.x; k < num_bins; k += BLOCK) {
        if (c[k]) atomicAdd(&counts[k], (unsigned long long)c[k]);
    }
}

// The same with the thresholds and the counts in global memory: histograms grown past what
// shared memory holds.
extern "C" __global__ void bin_f32_global(const float* __restrict__ x, unsigned long long n,
                                          const float* __restrict__ table, int num_bins, int positive,
                                          unsigned long long* __restrict__ counts)
{
    unsigned long long stride = (unsigned long long)gridDim.x * BLOCK;
    for (unsigned long long i = (unsigned long long)blockIdx.x * BLOCK + threadIdx.x; i < n; i += stride) {
        float v = x[i];
        v = positive ? fmaxf(v, 0.0f) : fabsf(v);
        atomicAdd(&counts[bin_of(table, num_bins, v)], 1ull);
    }
}
