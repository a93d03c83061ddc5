// Which weight a model's linears read after which, learnt from the calls, and the next weights read
// ahead by the pool's idle workers (docs/performance.md, session 25).
#include "weight_read_ahead.h"

#include "mkldnn_tensor.h"
#include "parallel.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace pagedlm::cpu {
namespace {

// Past the next weight's front, a step's short gaps rarely leave time for more; a few MB also stay
// far below the L3 the weights pass through.
constexpr int64_t kReadAheadBytes = int64_t{4} << 20;
// Each range costs the call a weak lock, an alias and oneDNN's data_ptr: 16 ranges of 128 KB
// weights added 6.6 us to a 1-row call, 4 added 3.5 (session 25); a real model's linears fill
// the bytes in 1-3.
constexpr size_t kMaxRanges = 4;
constexpr size_t kMaxWeights = 4096;  // forget everything past this many (models loaded and dropped)

using WeakTensor = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;

struct Next {
  WeakTensor weight;  // never keeps a dropped model's weight alive
  const char* data;   // its buffer when learnt (a weight's .data can be replaced)
  int64_t bytes;
  int parts;
};

std::mutex mutex;
std::unordered_map<const c10::TensorImpl*, Next> next_of;  // keys are only compared, never followed
const c10::TensorImpl* last = nullptr;

// A tensor on `weight`'s buffer that no Python object backs: the workers may drop the last reference
// to it, which must not need the GIL.
at::Tensor alias_of(const c10::intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>& weight) {
  return at::Tensor(weight->shallow_copy_and_detach(c10::VariableVersion(0), false));
}

}  // namespace

void read_next_weights_while_idle(const at::Tensor& weight, const void* data, int64_t bytes, int parts) {
  if (at::get_num_threads() < 2) return;
  // Never waits: another thread in here (or one that held the lock when this process forked) means
  // no read-ahead this time.
  std::unique_lock<std::mutex> lock(mutex, std::try_to_lock);
  if (!lock.owns_lock()) return;
  const c10::TensorImpl* key = weight.unsafeGetTensorImpl();
  if (last != nullptr && last != key) {
    auto it = next_of.find(last);
    if (it == next_of.end() || it->second.weight._unsafe_get_target() != key || it->second.data != data) {
      if (next_of.size() >= kMaxWeights) next_of.clear();
      next_of.insert_or_assign(last, Next{WeakTensor(weight.getIntrusivePtr()), static_cast<const char*>(data), bytes, parts});
    }
  }
  last = key;
  std::vector<ReadAhead> ranges;
  auto owner = std::make_shared<std::vector<at::Tensor>>();
  int64_t total = 0;
  const c10::TensorImpl* from = key;
  for (auto it = next_of.find(from); it != next_of.end() && total < kReadAheadBytes && ranges.size() < kMaxRanges;
       it = next_of.find(from)) {
    const Next& n = it->second;
    if (n.weight._unsafe_get_target() == key) break;
    auto alive = n.weight.lock();
    at::Tensor alias = alive ? alias_of(alive) : at::Tensor();
    if (!alias.defined() || mkldnn_data(alias) != n.data) {
      next_of.erase(it);
      break;
    }
    const int64_t run = std::min(n.bytes, kReadAheadBytes - total) / n.parts;
    ranges.push_back({n.data, run, n.bytes / n.parts, n.parts});
    total += run * n.parts;
    from = alive.get();
    owner->push_back(std::move(alias));
  }
  lock.unlock();
  read_while_idle(std::move(ranges), std::move(owner));
}

}  // namespace pagedlm::cpu
