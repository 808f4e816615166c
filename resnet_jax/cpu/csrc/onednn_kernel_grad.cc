// The kernel gradient of a channels-last 2-D convolution on oneDNN, as an XLA FFI handler.
//
// Why: XLA:CPU computes it as a convolution with batch and features swapped,
// which needs transposes of both operands and runs at ~80 GFLOP/s; oneDNN's
// `convolution_backward_weights` (PyTorch's CPU path) reads the NHWC input and
// output gradient as they are. Built and loaded by resnet_jax/onednn_ext.py.
//
// x: f32[N, H, W, C] (NHWC), dy: f32[N, Ho, Wo, O] (NHWC) -> dw: f32[KH, KW, C, O] (HWIO),
// the sum over the batch of this call's operands (under a mesh: one shard's part).
#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;

// One shape's primitives, made once (creation takes milliseconds; it also
// balances the work over the thread count, hence the count in the key).
struct Plan {
  dnnl::convolution_backward_weights backward;
  memory::desc src, diff_dst, diff_weights, hwio, backward_scratch, reorder_scratch;
  bool reorder;  // oneDNN's preferred weights format is blocked: reorder to HWIO
  dnnl::reorder to_hwio;
  size_t scratch;  // bytes: the blocked weights (if reordered), then the larger scratchpad
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);
  return *engine;
}

std::mutex plans_mutex;
std::map<Key, std::unique_ptr<Plan>>& Plans() {
  static auto* plans = new std::map<Key, std::unique_ptr<Plan>>();
  return *plans;
}

size_t Aligned(size_t bytes) { return (bytes + 63) / 64 * 64; }

std::unique_ptr<Plan> MakePlan(int64_t n, int64_t h, int64_t w, int64_t c, int64_t ho,
                               int64_t wo, int64_t o, int64_t kh, int64_t kw,
                               const memory::dims& strides, const memory::dims& pad_lo,
                               const memory::dims& pad_hi) {
  auto& engine = Engine();
  using tag = memory::format_tag;
  const auto f32 = memory::data_type::f32;
  memory::desc src({n, c, h, w}, f32, tag::nhwc), diff_dst({n, o, ho, wo}, f32, tag::nhwc);
  memory::desc hwio({o, c, kh, kw}, f32, tag::hwio), any({o, c, kh, kw}, f32, tag::any);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // concurrent calls: own scratch each
  auto forward = dnnl::convolution_forward::primitive_desc(
      engine, dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, src, any,
      diff_dst, strides, pad_lo, pad_hi);
  auto backward = dnnl::convolution_backward_weights::primitive_desc(
      engine, dnnl::algorithm::convolution_direct, src, any, diff_dst, strides, pad_lo, pad_hi,
      forward, attr);
  auto plan = std::make_unique<Plan>();
  plan->backward = dnnl::convolution_backward_weights(backward);
  plan->src = src;
  plan->diff_dst = diff_dst;
  plan->diff_weights = backward.diff_weights_desc();
  plan->hwio = hwio;
  plan->backward_scratch = backward.scratchpad_desc();
  plan->reorder = plan->diff_weights != hwio;
  plan->scratch = plan->backward_scratch.get_size();
  if (plan->reorder) {
    dnnl::primitive_attr reorder_attr;
    reorder_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    auto reorder = dnnl::reorder::primitive_desc(engine, plan->diff_weights, engine, hwio,
                                                 reorder_attr);
    plan->to_hwio = dnnl::reorder(reorder);
    plan->reorder_scratch = reorder.scratchpad_desc();
    plan->scratch = std::max(plan->scratch, plan->reorder_scratch.get_size()) +
                    Aligned(plan->diff_weights.get_size());
  }
  return plan;
}

ffi::Error KernelGradient(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride_h, int64_t stride_w,
                          int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                          int64_t pad_right, int64_t threads) {
  auto xd = x.dimensions(), yd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || yd.size() != 4 || wd.size() != 4 || xd[0] != yd[0] || xd[3] != wd[2] ||
      yd[3] != wd[3]) {
    return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                      "expected x [N,H,W,C], dy [N,Ho,Wo,O] and dw [KH,KW,C,O]");
  }
  const int64_t n = xd[0], h = xd[1], w = xd[2], c = xd[3], ho = yd[1], wo = yd[2], o = yd[3];
  const int64_t kh = wd[0], kw = wd[1];
  // oneDNN splits the work for the thread count it planned with: this thread's
  // teams get exactly `threads` (no dynamic adjustment); the caller's setting
  // is restored after the call.
  const int saved_threads = omp_get_max_threads();
  const int saved_dynamic = omp_get_dynamic();
  if (threads > 0) omp_set_num_threads(static_cast<int>(threads));
  omp_set_dynamic(0);
  struct Restore {
    int threads, dynamic;
    ~Restore() {
      omp_set_num_threads(threads);
      omp_set_dynamic(dynamic);
    }
  } restore{saved_threads, saved_dynamic};
  const Key key{n, h, w, c, ho, wo, o, kh, kw, stride_h, stride_w, pad_top, pad_bottom,
                pad_left, pad_right, omp_get_max_threads()};
  try {
    Plan* plan;
    {
      std::lock_guard<std::mutex> lock(plans_mutex);
      auto& slot = Plans()[key];
      if (!slot) {
        slot = MakePlan(n, h, w, c, ho, wo, o, kh, kw, {stride_h, stride_w},
                        {pad_top, pad_left}, {pad_bottom, pad_right});
      }
      plan = slot.get();
    }
    thread_local std::vector<char> scratch;
    if (scratch.size() < plan->scratch + 64) scratch.resize(plan->scratch + 64);
    char* base = scratch.data() + (64 - reinterpret_cast<uintptr_t>(scratch.data()) % 64) % 64;
    auto& engine = Engine();
    dnnl::stream stream(engine);
    memory src(plan->src, engine, x.typed_data());
    memory diff_dst(plan->diff_dst, engine, dy.typed_data());
    memory hwio(plan->hwio, engine, dw->typed_data());
    if (!plan->reorder) {
      memory pad(plan->backward_scratch, engine, base);
      plan->backward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_DIFF_WEIGHTS, hwio}, {DNNL_ARG_SCRATCHPAD, pad}});
    } else {
      const size_t offset = Aligned(plan->diff_weights.get_size());
      memory blocked(plan->diff_weights, engine, base);
      memory pad(plan->backward_scratch, engine, base + offset);
      plan->backward.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                      {DNNL_ARG_DIFF_WEIGHTS, blocked},
                                      {DNNL_ARG_SCRATCHPAD, pad}});
      memory reorder_pad(plan->reorder_scratch, engine, base + offset);
      plan->to_hwio.execute(stream, {{DNNL_ARG_FROM, blocked}, {DNNL_ARG_TO, hwio},
                                     {DNNL_ARG_SCRATCHPAD, reorder_pad}});
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("oneDNN: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxOnednnKernelGradient, KernelGradient,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x
                                  .Arg<ffi::Buffer<ffi::F32>>()  // dy
                                  .Ret<ffi::Buffer<ffi::F32>>()  // dw
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("threads"));
