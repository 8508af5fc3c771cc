// kernels.cuh: groupnorm's CUDA kernels. Compiled by nvcc (groupnorm_cuda.cu) and, for checks without a GPU, by a
// host compiler against tests/cuda_emu (compat.cuh says how).
//
// A tensor is seen as a matrix of dense rows, each read by a tile of threads:
//   channels first: N*C rows (one per (n, c)) of S elements; a tile is `tr` rows of `tc` lanes.
//   channels last:  for each sample, S rows of C elements; a tile is `tr` rows of `tc` lanes across channels.
// Each kernel that reduces splits the reduced axis into K chunks (the same for every device: the split depends on
// the shape alone) and writes one partial per (n, c, chunk), k-major ([k][n*C + c]). Partials are then merged in
// a fixed order (columns_merge_*, then *_finalize), so every result is the same bits run to run, with no
// atomics. The forward's partials are (mean, M2) pairs, merged by Chan's formula; the backward's are plain sums
// of dy and dy*(x - mean). The apply kernels then run one fused pass with per-(n, c) coefficients.
#ifndef GROUPNORM_CUDA_KERNELS_CUH_
#define GROUPNORM_CUDA_KERNELS_CUH_

#include "compat.cuh"

namespace gn_cuda {

constexpr int kThreads = 256;       // threads per block of every kernel
constexpr int kMergeLanes = 8;      // columns_merge_*: lanes along k per column (x 32 columns = kThreads)

// The compute type: float for float, float16 and bfloat16 data; double for double.
template <class S> struct Compute { using type = float; };
template <> struct Compute<double> { using type = double; };

GN_DEVICE float gn_exp(float v) { return expf(v); }
GN_DEVICE double gn_exp(double v) { return exp(v); }
GN_DEVICE float gn_sqrt(float v) { return sqrtf(v); }
GN_DEVICE double gn_sqrt(double v) { return sqrt(v); }

// V elements of S, loaded or stored as one 16-byte (or smaller) access.
template <class S, int V> struct alignas(sizeof(S) * V) Pack { S v[V]; };

template <class S, int V, class A>
GN_DEVICE void load(const S* p, A (&out)[V]) {
  const Pack<S, V> pack = *reinterpret_cast<const Pack<S, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = static_cast<A>(gn_widen(pack.v[j]));
}

template <class S, int V, class A>
GN_DEVICE void store(S* p, const A (&in)[V]) {
  Pack<S, V> pack;
#pragma unroll
  for (int j = 0; j < V; ++j) gn_store(&pack.v[j], in[j]);
  *reinterpret_cast<Pack<S, V>*>(p) = pack;
}

// The shape and the split, computed on the host (plan() in groupnorm_cuda_impl.cuh) and passed by value.
struct Geometry {
  int64_t n, c, s, groups, d;  // d: channels per group
  int64_t width;               // vectors per row: S/V (channels first) or C/V (channels last)
  int64_t rows;                // rows: N*C (channels first) or S per sample (channels last)
  int64_t k;                   // chunks along the reduced axis of a row (first) or of the rows (last)
  int64_t chunk;               // vectors (first) or rows (last) per chunk
  int tc, tr;                  // lanes along a row and rows per tile: tc * tr == kThreads, both powers of two
  int silu;
};

// Chunk k of the reduced axis: [begin, end) in vectors of a row (channels first) or in rows (channels last).
struct Chunk {
  int64_t k, begin, end;
};
GN_DEVICE Chunk chunk_of(const Geometry& g, int64_t k, bool channels_last) {
  const int64_t extent = channels_last ? g.s : g.width, begin = k * g.chunk;
  return Chunk{k, begin, begin + g.chunk < extent ? begin + g.chunk : extent};
}

// Elements of the reduced axis in chunk k: vectors * V (channels first) or rows (channels last).
GN_DEVICE int64_t chunk_count(const Geometry& g, int64_t k, int v, bool channels_last) {
  const Chunk ch = chunk_of(g, k, channels_last);
  return channels_last ? ch.end - ch.begin : (ch.end - ch.begin) * v;
}

// Where a data kernel's thread works: its row lane rl and its lane cl along a row, its block's chunk, and its first
// row (channels first: the row among N*C) or first sample (channels last). `reversed` takes the blocks in the
// opposite order (the apply kernels: see last_first below).
struct Tile {
  int rl, cl;
  Chunk chunk;
  int64_t first;  // the row (channels first) or the first sample (channels last, then every gridDim.y-th)
};
GN_DEVICE Tile tile_of(const Geometry& g, bool channels_last, bool reversed) {
  const unsigned bx = reversed ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
  const unsigned by = reversed ? gridDim.y - 1 - blockIdx.y : blockIdx.y;
  Tile tile;
  tile.rl = threadIdx.x / g.tc;
  tile.cl = threadIdx.x % g.tc;
  tile.chunk = chunk_of(g, channels_last ? bx : by, channels_last);
  tile.first = channels_last ? int64_t(by) : int64_t(bx) * g.tr + tile.rl;
  return tile;
}

// Statistics of a set of values: the count, the mean as a pivot (one of the values, exact) plus an offset (small
// against the pivot when the spread is small against the mean), and M2, the sum of squared deviations. The mean of
// data at 1e4 with a spread of 1 is then held to far better than float32's 1e-3 at 1e4, and the apply centres x
// on the pivot (exact) before the offset.
template <class A> struct Moments {
  A n, pivot, offset, m2;
};

GN_DEVICE float gn_abs(float v) { return fabsf(v); }
GN_DEVICE double gn_abs(double v) { return fabs(v); }

// b merged into a by Chan et al.'s formula. The merged pivot is that of the side whose mean lies closer to its
// pivot (an outlier pivot, the zero border of an image, say, does not survive a merge with a well-centred side),
// and both offsets are taken relative to it. Order-dependent, so every caller merges in a fixed order.
template <class A>
GN_DEVICE void chan_merge(Moments<A>& a, const Moments<A>& b) {
  if (b.n == A(0)) return;
  if (a.n == A(0)) {
    a = b;
    return;
  }
  const A n = a.n + b.n;
  A pivot = a.pivot, da = a.offset, db = (b.pivot - a.pivot) + b.offset;
  if (gn_abs(b.offset) < gn_abs(a.offset)) {
    pivot = b.pivot;
    da = (a.pivot - b.pivot) + a.offset;
    db = b.offset;
  }
  const A delta = db - da;
  const A frac = b.n / n;
  a.offset = da + delta * frac;
  a.m2 += b.m2 + delta * delta * a.n * frac;
  a.pivot = pivot;
  a.n = n;
}

// Moments in shared memory as four arrays of `slots` (kThreads unless said): load, store, and the merge of slot o
// into slot t.
template <class A> GN_DEVICE Moments<A> shared_moments(const A* sh, int t, int slots = kThreads) {
  return Moments<A>{sh[t], sh[slots + t], sh[2 * slots + t], sh[3 * slots + t]};
}
template <class A> GN_DEVICE void store_moments(A* sh, int t, const Moments<A>& m, int slots = kThreads) {
  sh[t] = m.n;
  sh[slots + t] = m.pivot;
  sh[2 * slots + t] = m.offset;
  sh[3 * slots + t] = m.m2;
}
template <class A> GN_DEVICE void merge_shared(A* sh, int t, int o, int slots = kThreads) {
  Moments<A> a = shared_moments(sh, t, slots);
  chan_merge(a, shared_moments(sh, o, slots));
  store_moments(sh, t, a, slots);
}

// A partial's moments from [k][n*C + c]-ordered arrays (count from the chunk).
template <class A> GN_DEVICE Moments<A> partial_moments(const A* const* parts, int64_t at, A count) {
  return Moments<A>{count, parts[0][at], parts[1][at], parts[2][at]};
}

// SiLU's value and derivative at y.
template <class A> GN_DEVICE A silu(A y) { return y / (A(1) + gn_exp(-y)); }
template <class A> GN_DEVICE A silu_grad(A y) {
  const A s = A(1) / (A(1) + gn_exp(-y));
  return s * (A(1) + y * (A(1) - s));
}

// ---------------------------------------------------------------------------------------------------------------
// Forward pass 1: the moments of each (row, chunk) partial. Each thread sums its values shifted by the first of
// them (its own pivot), so an outlier pivot spoils only the few values of one thread; the threads' moments are
// then merged by Chan's formula in a fixed tree.

// Shifted sums -> moments.
template <class A> GN_DEVICE Moments<A> thread_moments(A count, A pivot, A s1, A s2) {
  if (count == A(0)) return Moments<A>{0, 0, 0, 0};
  const A m2 = s2 - s1 * (s1 / count);
  return Moments<A>{count, pivot, s1 / count, m2 > A(0) ? m2 : A(0)};
}

template <class S, int V>
GN_GLOBAL void forward_partials_first(const S* __restrict__ x, Geometry g, typename Compute<S>::type* part_pivot,
                                      typename Compute<S>::type* part_offset, typename Compute<S>::type* part_m2) {
  using A = typename Compute<S>::type;
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 4 * kThreads
  const int t = threadIdx.x;
  const Tile tile = tile_of(g, false, false);
  const int cl = tile.cl;
  const int64_t row = tile.first, k = tile.chunk.k, begin = tile.chunk.begin, end = tile.chunk.end;
  const bool live = row < g.rows;
  A count = 0, s1 = 0, s2 = 0, pivot = 0;
  if (live && begin + cl < end) {
    const S* xr = x + row * g.s;
    pivot = static_cast<A>(gn_widen(xr[(begin + cl) * V]));
    for (int64_t col = begin + cl; col < end; col += g.tc) {
      A v[V];
      load<S, V>(xr + col * V, v);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A dv = v[j] - pivot;
        s1 += dv;
        s2 += dv * dv;
      }
      count += A(V);
    }
  }
  store_moments(sh, t, thread_moments(count, pivot, s1, s2));
  __syncthreads();
  for (int off = g.tc / 2; off > 0; off /= 2) {  // within each row's lanes
    if (cl < off) merge_shared(sh, t, t + off);
    __syncthreads();
  }
  if (live && cl == 0) {
    const Moments<A> m = shared_moments(sh, t);
    part_pivot[k * g.rows + row] = m.pivot;
    part_offset[k * g.rows + row] = m.offset;
    part_m2[k * g.rows + row] = m.m2;
  }
}

template <class S, int V>
GN_GLOBAL void forward_partials_last(const S* __restrict__ x, Geometry g, typename Compute<S>::type* part_pivot,
                                     typename Compute<S>::type* part_offset, typename Compute<S>::type* part_m2) {
  using A = typename Compute<S>::type;
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 4 * kThreads * V: slot t * V + j, four arrays
  constexpr int kSlots = kThreads * V;
  const int t = threadIdx.x;
  const Tile tile = tile_of(g, true, false);
  const int rl = tile.rl, cl = tile.cl;
  const int64_t k = tile.chunk.k, begin = tile.chunk.begin, end = tile.chunk.end;
  const int64_t nc = g.n * g.c;
  for (int64_t n = tile.first; n < g.n; n += gridDim.y) {
    const S* xn = x + n * g.s * g.c;
    for (int64_t base = 0; base < g.width; base += g.tc) {  // the same trip count for every thread
      const int64_t cv = base + cl;
      A count = 0, s1[V], s2[V], pivot[V];
#pragma unroll
      for (int j = 0; j < V; ++j) s1[j] = s2[j] = pivot[j] = 0;
      if (cv < g.width && begin + rl < end) {
        load<S, V>(xn + (begin + rl) * g.c + cv * V, pivot);
        for (int64_t r = begin + rl; r < end; r += g.tr) {
          A v[V];
          load<S, V>(xn + r * g.c + cv * V, v);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A dv = v[j] - pivot[j];
            s1[j] += dv;
            s2[j] += dv * dv;
          }
          count += A(1);
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) store_moments(sh, t * V + j, thread_moments(count, pivot[j], s1[j], s2[j]), kSlots);
      __syncthreads();
      for (int off = g.tr / 2; off > 0; off /= 2) {  // across the row lanes of each channel
        if (rl < off) {
#pragma unroll
          for (int j = 0; j < V; ++j) merge_shared(sh, t * V + j, (t + off * g.tc) * V + j, kSlots);
        }
        __syncthreads();
      }
      if (cv < g.width && rl == 0) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const Moments<A> m = shared_moments(sh, t * V + j, kSlots);
          const int64_t at = k * nc + n * g.c + cv * V + j;
          part_pivot[at] = m.pivot;
          part_offset[at] = m.offset;
          part_m2[at] = m.m2;
        }
      }
      __syncthreads();  // the tree's shared memory is reused by the next channels
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Merging partials. columns_merge_* fold the K partials of every (n, c) into one, 32 columns a block and 8 lanes
// along k, in a fixed tree. They run when K is large, so that *_finalize merges D items per group, not D*K.

template <class A>
GN_GLOBAL void columns_merge_moments(const A* pivot, const A* offset, const A* m2, Geometry g, int v,
                                     int channels_last, A* out_pivot, A* out_offset, A* out_m2) {
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 4 * kThreads
  const int t = threadIdx.x, cl = t % 32, kl = t / 32;
  const int64_t nc = g.n * g.c, col = int64_t(blockIdx.x) * 32 + cl;
  const A* parts[3] = {pivot, offset, m2};
  Moments<A> acc{0, 0, 0, 0};
  if (col < nc) {
    for (int64_t k = kl; k < g.k; k += kMergeLanes)
      chan_merge(acc, partial_moments(parts, k * nc + col, static_cast<A>(chunk_count(g, k, v, channels_last != 0))));
  }
  store_moments(sh, t, acc);
  __syncthreads();
  for (int off = kMergeLanes / 2; off > 0; off /= 2) {
    if (kl < off) merge_shared(sh, t, t + off * 32);
    __syncthreads();
  }
  if (kl == 0 && col < nc) {
    out_pivot[col] = sh[kThreads + t];
    out_offset[col] = sh[2 * kThreads + t];
    out_m2[col] = sh[3 * kThreads + t];
  }
}

// Sums over the rows of two [rows][cols] arrays, in0's terms scaled by scale(row, col): 32 columns a block and
// kMergeLanes lanes along the rows, then a fixed tree in shared memory (2 * kThreads). Returns whether this thread
// holds a column's sums (lane 0 of a column that exists); col, s0 and s1 are then that column and its sums.
template <class A, class Scale>
GN_DEVICE bool column_pair_sums(const A* in0, const A* in1, int64_t rows, int64_t cols, Scale scale, int64_t& col,
                                A& s0, A& s1) {
  A* sh = reinterpret_cast<A*>(gn_shared_memory());
  const int t = threadIdx.x, cl = t % 32, kl = t / 32;
  col = int64_t(blockIdx.x) * 32 + cl;
  A a0 = 0, a1 = 0;
  if (col < cols) {
    for (int64_t k = kl; k < rows; k += kMergeLanes) {
      a0 += scale(k, col) * in0[k * cols + col];
      a1 += in1[k * cols + col];
    }
  }
  sh[t] = a0;
  sh[kThreads + t] = a1;
  __syncthreads();
  for (int off = kMergeLanes / 2; off > 0; off /= 2) {
    if (kl < off) {
      sh[t] += sh[t + off * 32];
      sh[kThreads + t] += sh[kThreads + t + off * 32];
    }
    __syncthreads();
  }
  s0 = sh[t];
  s1 = sh[kThreads + t];
  return kl == 0 && col < cols;
}

template <class A>
GN_GLOBAL void columns_merge_sums(const A* in0, const A* in1, Geometry g, A* out0, A* out1) {
  int64_t col;
  A s0, s1;
  if (column_pair_sums(in0, in1, g.k, g.n * g.c, [](int64_t, int64_t) { return A(1); }, col, s0, s1)) {
    out0[col] = s0;
    out1[col] = s1;
  }
}

// Widened parameter c, or `fallback` when there is none.
template <class P, class A> GN_DEVICE A param(const P* p, int64_t c, A fallback) {
  return p ? static_cast<A>(gn_widen(p[c])) : fallback;
}

// Forward pass 2, one block per (n, g): merges the group's partials (`kc` per channel: K, or 1 after
// columns_merge_moments) into its mean and rstd, and writes each channel's coefficients of
// y = ((x - pivot) - offset) * scale + shift, where pivot is one of the group's values and pivot + offset its mean.
// x - pivot is exact for values near the mean, and so is the subtraction of the small offset where the result is
// small, so y keeps a relative accuracy even where x is near the mean: x * scale + (bias - mean * scale) would
// cancel in float32 for a large mean (1e4 against a spread of 1), and (x - pivot) * scale + (bias - offset * scale)
// would lose y's low bits where y is near 0.
template <class A, class P>
GN_GLOBAL void forward_finalize(const A* part_pivot, const A* part_offset, const A* part_m2, int64_t kc, Geometry g,
                                int v, int channels_last, A eps, const P* weight, const P* bias, A* mean_out,
                                A* rstd_out, A* scale, A* shift, A* pivot, A* offset) {
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 4 * kThreads
  const int t = threadIdx.x;
  const int64_t ng = blockIdx.x, n = ng / g.groups, c0 = (ng % g.groups) * g.d, nc = g.n * g.c;
  const int64_t items = g.d * kc;
  const A* parts[3] = {part_pivot, part_offset, part_m2};
  Moments<A> acc{0, 0, 0, 0};
  for (int64_t i = t; i < items; i += kThreads) {  // item i: channel c0 + i / kc, chunk i % kc
    const int64_t k = i % kc, at = k * nc + n * g.c + c0 + i / kc;
    const A count = static_cast<A>(kc == 1 ? g.s : chunk_count(g, k, v, channels_last != 0));
    chan_merge(acc, partial_moments(parts, at, count));
  }
  store_moments(sh, t, acc);
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off /= 2) {
    if (t < off) merge_shared(sh, t, t + off);
    __syncthreads();
  }
  const Moments<A> group = shared_moments(sh, 0);
  const A var = group.m2 / group.n;
  const A rstd = A(1) / gn_sqrt((var > A(0) ? var : A(0)) + eps);
  if (t == 0) {
    if (mean_out) mean_out[ng] = group.pivot + group.offset;
    if (rstd_out) rstd_out[ng] = rstd;
  }
  for (int64_t c = c0 + t; c < c0 + g.d; c += kThreads) {
    scale[n * g.c + c] = rstd * param(weight, c, A(1));
    shift[n * g.c + c] = param(bias, c, A(0));
    pivot[n * g.c + c] = group.pivot;
    offset[n * g.c + c] = group.offset;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The forward's apply: y = ((x - pivot) - offset) * scale + shift (then SiLU), one pass.
//
// last_first: the apply kernels (the backward's too) take their tiles in the reverse of the order pass 1 read them
// (blocks start roughly in index order), so that the first tiles they read again are the last ones pass 1 read,
// the likeliest to be still in L2 (50 MB on an H100). Not yet measured on a GPU.
constexpr bool kLastFirst = true;

template <class S, int V>
GN_GLOBAL void forward_apply_first(const S* x, Geometry g, const typename Compute<S>::type* scale,
                                   const typename Compute<S>::type* shift, const typename Compute<S>::type* pivot,
                                   const typename Compute<S>::type* offset, S* y) {
  using A = typename Compute<S>::type;
  const Tile tile = tile_of(g, false, kLastFirst);
  const int cl = tile.cl;
  const int64_t row = tile.first, begin = tile.chunk.begin, end = tile.chunk.end;
  if (row >= g.rows) return;
  const A a = scale[row], b = shift[row], p = pivot[row], d = offset[row];
  const S* xr = x + row * g.s;
  S* yr = y + row * g.s;
  for (int64_t col = begin + cl; col < end; col += g.tc) {
    A v[V];
    load<S, V>(xr + col * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      v[j] = ((v[j] - p) - d) * a + b;
      if (g.silu) v[j] = silu(v[j]);
    }
    store<S, V>(yr + col * V, v);
  }
}

template <class S, int V>
GN_GLOBAL void forward_apply_last(const S* x, Geometry g, const typename Compute<S>::type* scale,
                                  const typename Compute<S>::type* shift, const typename Compute<S>::type* pivot,
                                  const typename Compute<S>::type* offset, S* y) {
  using A = typename Compute<S>::type;
  const Tile tile = tile_of(g, true, kLastFirst);
  const int rl = tile.rl, cl = tile.cl;
  const int64_t begin = tile.chunk.begin, end = tile.chunk.end;
  for (int64_t n = tile.first; n < g.n; n += gridDim.y) {
    const int64_t sample = n * g.s * g.c;
    for (int64_t cv = cl; cv < g.width; cv += g.tc) {
      A a[V], b[V], p[V], d[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        a[j] = scale[n * g.c + cv * V + j];
        b[j] = shift[n * g.c + cv * V + j];
        p[j] = pivot[n * g.c + cv * V + j];
        d[j] = offset[n * g.c + cv * V + j];
      }
      for (int64_t r = begin + rl; r < end; r += g.tr) {
        const int64_t at = sample + r * g.c + cv * V;
        A v[V];
        load<S, V>(x + at, v);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          v[j] = ((v[j] - p[j]) - d[j]) * a[j] + b[j];
          if (g.silu) v[j] = silu(v[j]);
        }
        store<S, V>(y + at, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward. With SiLU, dy is the gradient at the SiLU's input y = (x - mean) * fscale + fshift, recomputed from
// x (centred as the forward's apply centres it).
// Pass 1: per (row, chunk) sums of dy and of dy * (x - mean).

template <class A> GN_DEVICE A pre_activation_grad(A dz, A centred_x, A fscale, A fshift, int silu_on) {
  return silu_on ? dz * silu_grad(centred_x * fscale + fshift) : dz;
}

template <class S, int V>
GN_GLOBAL void backward_partials_first(const S* __restrict__ dz, const S* __restrict__ x, Geometry g,
                                       const typename Compute<S>::type* mean,
                                       const typename Compute<S>::type* fscale,
                                       const typename Compute<S>::type* fshift, typename Compute<S>::type* part_dy,
                                       typename Compute<S>::type* part_dyx) {
  using A = typename Compute<S>::type;
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 2 * kThreads
  const int t = threadIdx.x;
  const Tile tile = tile_of(g, false, false);
  const int cl = tile.cl;
  const int64_t row = tile.first, k = tile.chunk.k, begin = tile.chunk.begin, end = tile.chunk.end;
  const bool live = row < g.rows;
  A s1 = 0, s2 = 0;
  if (live) {
    const int64_t n = row / g.c, c = row % g.c;
    const A mu = mean[n * g.groups + c / g.d];
    const A fa = g.silu ? fscale[row] : A(0), fb = g.silu ? fshift[row] : A(0);
    const S* xr = x + row * g.s;
    const S* dzr = dz + row * g.s;
    for (int64_t col = begin + cl; col < end; col += g.tc) {
      A xv[V], dv[V];
      load<S, V>(xr + col * V, xv);
      load<S, V>(dzr + col * V, dv);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A dy = pre_activation_grad(dv[j], xv[j] - mu, fa, fb, g.silu);
        s1 += dy;
        s2 += dy * (xv[j] - mu);
      }
    }
  }
  sh[t] = s1;
  sh[kThreads + t] = s2;
  __syncthreads();
  for (int off = g.tc / 2; off > 0; off /= 2) {
    if (cl < off) {
      sh[t] += sh[t + off];
      sh[kThreads + t] += sh[kThreads + t + off];
    }
    __syncthreads();
  }
  if (live && cl == 0) {
    part_dy[k * g.rows + row] = sh[t];
    part_dyx[k * g.rows + row] = sh[kThreads + t];
  }
}

template <class S, int V>
GN_GLOBAL void backward_partials_last(const S* __restrict__ dz, const S* __restrict__ x, Geometry g,
                                      const typename Compute<S>::type* mean, const typename Compute<S>::type* fscale,
                                      const typename Compute<S>::type* fshift, typename Compute<S>::type* part_dy,
                                      typename Compute<S>::type* part_dyx) {
  using A = typename Compute<S>::type;
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 2 * kThreads * V
  const int t = threadIdx.x;
  const Tile tile = tile_of(g, true, false);
  const int rl = tile.rl, cl = tile.cl;
  const int64_t k = tile.chunk.k, begin = tile.chunk.begin, end = tile.chunk.end;
  const int64_t nc = g.n * g.c;
  for (int64_t n = tile.first; n < g.n; n += gridDim.y) {
    const int64_t sample = n * g.s * g.c;
    for (int64_t base = 0; base < g.width; base += g.tc) {  // the same trip count for every thread
      const int64_t cv = base + cl;
      const bool live = cv < g.width;
      A s1[V], s2[V], mu[V], fa[V], fb[V];
#pragma unroll
      for (int j = 0; j < V; ++j) s1[j] = s2[j] = mu[j] = fa[j] = fb[j] = 0;
      if (live) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t c = cv * V + j;
          mu[j] = mean[n * g.groups + c / g.d];
          if (g.silu) {
            fa[j] = fscale[n * g.c + c];
            fb[j] = fshift[n * g.c + c];
          }
        }
        for (int64_t r = begin + rl; r < end; r += g.tr) {
          const int64_t at = sample + r * g.c + cv * V;
          A xv[V], dv[V];
          load<S, V>(x + at, xv);
          load<S, V>(dz + at, dv);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A dy = pre_activation_grad(dv[j], xv[j] - mu[j], fa[j], fb[j], g.silu);
            s1[j] += dy;
            s2[j] += dy * (xv[j] - mu[j]);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sh[t * V + j] = s1[j];
        sh[(kThreads + t) * V + j] = s2[j];
      }
      __syncthreads();
      for (int off = g.tr / 2; off > 0; off /= 2) {
        if (rl < off) {
          const int o = off * g.tc;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            sh[t * V + j] += sh[(t + o) * V + j];
            sh[(kThreads + t) * V + j] += sh[(kThreads + t + o) * V + j];
          }
        }
        __syncthreads();
      }
      if (live && rl == 0) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const int64_t at = k * nc + n * g.c + cv * V + j;
          part_dy[at] = sh[t * V + j];
          part_dyx[at] = sh[(kThreads + t) * V + j];
        }
      }
      __syncthreads();
    }
  }
}

// Backward pass 2, one block per (n, g): each channel's sums over its chunks (kept for the parameter gradients),
// the group's sums weighted by the weight, and each channel's coefficients of
// dx = cdy * dy + cx * (x - mean) + c0.
template <class A, class P>
GN_GLOBAL void backward_finalize(const A* part_dy, const A* part_dyx, int64_t kc, Geometry g, const A* mean,
                                 const A* rstd, const P* weight, A* sum_dy, A* sum_dyx, A* cdy, A* cx, A* c0,
                                 A* cmean) {
  A* sh = reinterpret_cast<A*>(gn_shared_memory());  // 2 * kThreads
  const int t = threadIdx.x;
  const int64_t ng = blockIdx.x, n = ng / g.groups, cg = (ng % g.groups) * g.d, nc = g.n * g.c;
  A db = 0, ds = 0;
  for (int64_t c = cg + t; c < cg + g.d; c += kThreads) {
    A sdy = 0, sdyx = 0;
    for (int64_t k = 0; k < kc; ++k) {
      sdy += part_dy[k * nc + n * g.c + c];
      sdyx += part_dyx[k * nc + n * g.c + c];
    }
    sum_dy[n * g.c + c] = sdy;
    sum_dyx[n * g.c + c] = sdyx;
    const A w = param(weight, c, A(1));
    db += w * sdy;
    ds += w * sdyx;
  }
  sh[t] = db;
  sh[kThreads + t] = ds;
  __syncthreads();
  for (int off = kThreads / 2; off > 0; off /= 2) {
    if (t < off) {
      sh[t] += sh[t + off];
      sh[kThreads + t] += sh[kThreads + t + off];
    }
    __syncthreads();
  }
  const A r = rstd[ng], mu = mean[ng], count = static_cast<A>(g.d * g.s);
  const A coef_x = -r * r * r * sh[kThreads] / count, coef_0 = -r * sh[0] / count;
  for (int64_t c = cg + t; c < cg + g.d; c += kThreads) {
    cdy[n * g.c + c] = r * param(weight, c, A(1));
    cx[n * g.c + c] = coef_x;
    c0[n * g.c + c] = coef_0;
    cmean[n * g.c + c] = mu;
  }
}

// grad_weight[c] = sum over n of rstd * sum(dy * (x - mean)); grad_bias[c] = sum over n of sum(dy): 32 channels a
// block and kMergeLanes lanes along n, in a fixed order (one thread a channel walking all of N took 40000
// dependent steps for a (40000, 4) input).
template <class A>
GN_GLOBAL void backward_params(const A* sum_dy, const A* sum_dyx, const A* rstd, Geometry g, A* grad_weight,
                               A* grad_bias) {
  int64_t c;
  A gw, gb;
  auto scale = [&](int64_t n, int64_t ch) { return rstd[n * g.groups + ch / g.d]; };
  if (column_pair_sums(sum_dyx, sum_dy, g.n, g.c, scale, c, gw, gb)) {
    if (grad_weight) grad_weight[c] = gw;
    if (grad_bias) grad_bias[c] = gb;
  }
}

// The forward's per-(n, c) scale and shift from the given rstd (the backward's SiLU recomputes y with them).
template <class A, class P>
GN_GLOBAL void forward_coefficients(const A* rstd, Geometry g, const P* weight, const P* bias, A* scale,
                                    A* shift) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i >= g.n * g.c) return;
  const int64_t n = i / g.c, c = i % g.c, ng = n * g.groups + c / g.d;
  scale[i] = rstd[ng] * param(weight, c, A(1));
  shift[i] = param(bias, c, A(0));
}

// Backward pass 3: dx = cdy * dy + cx * (x - mean) + c0, one pass.
template <class S, class A, int V>
GN_DEVICE void backward_apply_vector(const S* dz, const S* x, S* dx, int64_t at, const A (&cdy)[V],
                                     const A (&cx)[V], const A (&c0)[V], const A (&mu)[V], const A (&fa)[V],
                                     const A (&fb)[V], int silu_on) {
  A xv[V], dv[V];
  load<S, V>(x + at, xv);
  load<S, V>(dz + at, dv);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const A dy = pre_activation_grad(dv[j], xv[j] - mu[j], fa[j], fb[j], silu_on);
    dv[j] = cdy[j] * dy + cx[j] * (xv[j] - mu[j]) + c0[j];
  }
  store<S, V>(dx + at, dv);
}

template <class S, int V>
GN_GLOBAL void backward_apply_first(const S* dz, const S* x, Geometry g, const typename Compute<S>::type* cdy,
                                    const typename Compute<S>::type* cx, const typename Compute<S>::type* c0,
                                    const typename Compute<S>::type* cmean, const typename Compute<S>::type* fscale,
                                    const typename Compute<S>::type* fshift, S* dx) {
  using A = typename Compute<S>::type;
  const Tile tile = tile_of(g, false, kLastFirst);
  const int cl = tile.cl;
  const int64_t row = tile.first, begin = tile.chunk.begin, end = tile.chunk.end;
  if (row >= g.rows) return;
  A a[V], b[V], z[V], mu[V], fa[V], fb[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    a[j] = cdy[row];
    b[j] = cx[row];
    z[j] = c0[row];
    mu[j] = cmean[row];
    fa[j] = g.silu ? fscale[row] : A(0);
    fb[j] = g.silu ? fshift[row] : A(0);
  }
  for (int64_t col = begin + cl; col < end; col += g.tc)
    backward_apply_vector<S, A, V>(dz, x, dx, row * g.s + col * V, a, b, z, mu, fa, fb, g.silu);
}

template <class S, int V>
GN_GLOBAL void backward_apply_last(const S* dz, const S* x, Geometry g, const typename Compute<S>::type* cdy,
                                   const typename Compute<S>::type* cx, const typename Compute<S>::type* c0,
                                   const typename Compute<S>::type* cmean, const typename Compute<S>::type* fscale,
                                   const typename Compute<S>::type* fshift, S* dx) {
  using A = typename Compute<S>::type;
  const Tile tile = tile_of(g, true, kLastFirst);
  const int rl = tile.rl, cl = tile.cl;
  const int64_t begin = tile.chunk.begin, end = tile.chunk.end;
  for (int64_t n = tile.first; n < g.n; n += gridDim.y) {
    const int64_t sample = n * g.s * g.c;
    for (int64_t cv = cl; cv < g.width; cv += g.tc) {
      A a[V], b[V], z[V], mu[V], fa[V], fb[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int64_t i = n * g.c + cv * V + j;
        a[j] = cdy[i];
        b[j] = cx[i];
        z[j] = c0[i];
        mu[j] = cmean[i];
        fa[j] = g.silu ? fscale[i] : A(0);
        fb[j] = g.silu ? fshift[i] : A(0);
      }
      for (int64_t r = begin + rl; r < end; r += g.tr)
        backward_apply_vector<S, A, V>(dz, x, dx, sample + r * g.c + cv * V, a, b, z, mu, fa, fb, g.silu);
    }
  }
}

}  // namespace gn_cuda

#endif  // GROUPNORM_CUDA_KERNELS_CUH_
