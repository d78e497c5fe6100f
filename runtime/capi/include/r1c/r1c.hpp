// r1c C++ API: a header-only RAII wrapper over the C ABI of r1c.h (C++17). Errors become r1c::Error.
//
//   r1c::Engine engine("out/tiny.bundle", R"({"max_num_seqs": 32})");
//   r1c::Request req = engine.submit({1, 2, 3}, r1c::Sampling().max_tokens(8).temperature(0));
//   while (auto tok = req.next()) std::cout << tok->id << " " << tok->text << "\n";
//
// Engine and Request are move-only; a Request may outlive its Engine (it reads what was produced).
#ifndef R1C_HPP
#define R1C_HPP

#include <r1c/r1c.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace r1c {

class Error : public std::runtime_error {
public:
    Error(r1c_status status, const std::string& message) : std::runtime_error(message), status_(status) {}
    r1c_status status() const noexcept { return status_; }

private:
    r1c_status status_;
};

inline void check(r1c_status st) {
    if (st != R1C_OK && st != R1C_END) throw Error(st, std::string(r1c_status_name(st)) + ": " + r1c_last_error());
}

class Sampling {
public:
    Sampling() { r1c_sampling_init(&p_); }
    Sampling& max_tokens(int32_t v) { p_.max_tokens = v; return *this; }
    Sampling& temperature(double v) { p_.temperature = v; return *this; }
    Sampling& top_k(int32_t v) { p_.top_k = v; return *this; }
    Sampling& top_p(double v) { p_.top_p = v; return *this; }
    Sampling& min_p(double v) { p_.min_p = v; return *this; }
    Sampling& repetition_penalty(double v) { p_.repetition_penalty = v; return *this; }
    Sampling& presence_penalty(double v) { p_.presence_penalty = v; return *this; }
    Sampling& frequency_penalty(double v) { p_.frequency_penalty = v; return *this; }
    Sampling& seed(uint64_t v) { p_.has_seed = 1; p_.seed = v; return *this; }
    Sampling& ignore_eos(bool v) { p_.ignore_eos = v ? 1 : 0; return *this; }
    Sampling& logprobs(int32_t v) { p_.logprobs = v; return *this; }
    Sampling& stop_token_ids(std::vector<int32_t> v) { stop_ids_ = std::move(v); return *this; }
    Sampling& stop(std::vector<std::string> v) { stops_ = std::move(v); return *this; }

    // The C struct, pointing into this object (valid while it lives and is not modified).
    const r1c_sampling* c() const {
        stop_ptrs_.clear();
        for (const auto& s : stops_) stop_ptrs_.push_back(s.c_str());
        p_.stop_token_ids = stop_ids_.data();
        p_.n_stop_token_ids = stop_ids_.size();
        p_.stop = stop_ptrs_.data();
        p_.n_stop = stop_ptrs_.size();
        return &p_;
    }

private:
    mutable r1c_sampling p_{};
    std::vector<int32_t> stop_ids_;
    std::vector<std::string> stops_;
    mutable std::vector<const char*> stop_ptrs_;
};

struct Token {
    int32_t index = 0;
    int32_t id = -1;  // -1: a last event without a token (cancelled)
    std::string text;
    double logprob = 0.0;  // NaN unless logprobs were asked for
    std::vector<std::pair<int32_t, double>> top;
    std::optional<std::string> finish_reason;
};

struct Result {
    int32_t prompt_tokens = 0;
    std::vector<int32_t> token_ids;
    std::string text;
    std::string finish_reason;
};

class Request {
public:
    explicit Request(r1c_request* h) : h_(h) {}
    Request(Request&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    Request& operator=(Request&& o) noexcept {
        if (this != &o) {
            r1c_request_free(h_);
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    Request(const Request&) = delete;
    Request& operator=(const Request&) = delete;
    ~Request() { r1c_request_free(h_); }

    // The next token; std::nullopt at the end. Throws r1c::Error (status R1C_ERR_TIMEOUT after timeout_ms).
    std::optional<Token> next(int32_t timeout_ms = -1) {
        r1c_token t{};
        r1c_status st = r1c_next(h_, timeout_ms, &t);
        if (st == R1C_END) return std::nullopt;
        check(st);
        Token out;
        out.index = t.index;
        out.id = t.token_id;
        out.text.assign(t.text, t.text_len);
        out.logprob = t.logprob;
        for (int32_t i = 0; i < t.n_top; i++) out.top.emplace_back(t.top_ids[i], t.top_logprobs[i]);
        if (t.finish_reason) out.finish_reason = t.finish_reason;
        return out;
    }

    Result wait(int32_t timeout_ms = -1) {
        r1c_result r{};
        check(r1c_wait(h_, timeout_ms, &r));
        return Result{r.n_prompt_tokens, std::vector<int32_t>(r.token_ids, r.token_ids + r.n_tokens),
                      std::string(r.text, r.text_len), r.finish_reason};
    }

    void cancel() { check(r1c_cancel(h_)); }
    r1c_request* handle() const noexcept { return h_; }

private:
    r1c_request* h_;
};

class Engine {
public:
    explicit Engine(const std::string& bundle_dir, const std::string& options_json = "") {
        check(r1c_open(bundle_dir.c_str(), options_json.empty() ? nullptr : options_json.c_str(), &h_));
    }
    Engine(Engine&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
    Engine& operator=(Engine&& o) noexcept {
        if (this != &o) {
            if (h_) r1c_close(h_);
            h_ = std::exchange(o.h_, nullptr);
        }
        return *this;
    }
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;
    ~Engine() {
        if (h_) r1c_close(h_);
    }

    Request submit(const std::vector<int32_t>& ids, const Sampling& s = Sampling()) {
        r1c_request* r = nullptr;
        check(r1c_submit_ids(h_, ids.data(), ids.size(), s.c(), &r));
        return Request(r);
    }
    Request submit(const std::string& text, const Sampling& s = Sampling()) {
        r1c_request* r = nullptr;
        check(r1c_submit_text(h_, text.c_str(), s.c(), &r));
        return Request(r);
    }
    r1c_info info() const {
        r1c_info i{};
        check(r1c_engine_info(h_, &i));
        return i;
    }
    std::string token_str(int32_t id) const {
        size_t n = 0;
        char buf[256];
        check(r1c_token_str(h_, id, buf, sizeof buf, &n));
        if (n < sizeof buf) return std::string(buf, n);
        std::string big(n + 1, '\0');
        check(r1c_token_str(h_, id, big.data(), big.size(), &n));
        big.resize(n);
        return big;
    }
    r1c_engine* handle() const noexcept { return h_; }

private:
    r1c_engine* h_ = nullptr;
};

}  // namespace r1c

#endif  // R1C_HPP
