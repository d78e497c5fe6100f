// r1c's CPU kernel library: the entry point ONNX Runtime calls (SessionOptions.register_custom_ops_library):
// registers the `r1c.cpu` domain with `MoE` (moe_cpu.cc), `Linear` (linear_cpu.cc), `MLAAttention` and
// `MLAAttentionInt8` (attention_cpu.cc), `MLABlock` (mla_block_cpu.cc). The library's other entry points are the
// native decode step's C functions (decode_cpu.cc: r1c_decode_new / r1c_decode_step / r1c_decode_free).
#include "panels.h"

#include <memory>
#include <mutex>

#define R1C_STR2(x) #x
#define R1C_STR(x) R1C_STR2(x)

namespace r1c_cpu {
Ort::Custom::OrtLiteCustomOp* make_moe_op();
Ort::Custom::OrtLiteCustomOp* make_linear_op();
Ort::Custom::OrtLiteCustomOp* make_attention_op();
Ort::Custom::OrtLiteCustomOp* make_attention_int8_op();
Ort::Custom::OrtLiteCustomOp* make_mla_block_op();
}  // namespace r1c_cpu

extern "C" __attribute__((visibility("default"))) OrtStatus* ORT_API_CALL
RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr)  // an ONNX Runtime older than the headers: say so through the oldest API, which every one has
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, "r1c.cpu: this library needs ONNX Runtime's C API version "
                                             R1C_STR(ORT_API_VERSION) " or newer (rebuild the bundle here)");
  Ort::InitApi(api);
  static std::once_flag once;
  static std::unique_ptr<Ort::CustomOpDomain> domain;
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> moe, linear, attention, attention_int8, mla_block;
  try {
    std::call_once(once, [] {
      domain = std::make_unique<Ort::CustomOpDomain>("r1c.cpu");
      moe.reset(r1c_cpu::make_moe_op());
      domain->Add(moe.get());
      linear.reset(r1c_cpu::make_linear_op());
      domain->Add(linear.get());
      attention.reset(r1c_cpu::make_attention_op());
      domain->Add(attention.get());
      attention_int8.reset(r1c_cpu::make_attention_int8_op());
      domain->Add(attention_int8.get());
      mla_block.reset(r1c_cpu::make_mla_block_op());
      domain->Add(mla_block.get());
    });
    Ort::UnownedSessionOptions(options).Add(*domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  } catch (const std::exception& e) {
    return Ort::GetApi().CreateStatus(ORT_FAIL, e.what());
  }
  return nullptr;
}
