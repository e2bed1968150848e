// Calling moeyard's own ops through the dispatcher (from autograd functions and composed ops), so
// that each call goes through the dispatch keys below Autograd (CPU, CUDA, Meta, Fake) as a
// user's call would.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace moeyard {

// The typed handle of the op called `name` ("moeyard::..."); look it up once (a static).
template <typename Signature>
auto typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace moeyard
