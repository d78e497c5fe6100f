// r1c_cpp_server: an OpenAI-compatible /v1/completions server in C++ over the r1c C ABI (r1c.hpp), with
// cpp-httplib and nlohmann::json. It answers the same requests with the same JSON as `r1c serve`:
// POST /v1/completions (text or token-id prompt, stream: true as server-sent events), GET /v1/models, /health.
//
//   r1c_cpp_server BUNDLE --port N [--host 127.0.0.1] [--model-name NAME] [--options JSON]
//
// Sampling parameters are checked by r1c itself (the C ABI returns the same messages r1c serve sends); this file
// only parses JSON, maps fields, and writes responses. A streaming client that goes away is noticed at the next
// write and its request is cancelled (freed with the request object). SIGINT (Ctrl-C) and SIGTERM stop it cleanly:
// the server stops taking connections, finishes the requests it holds, closes the engine and exits 0.
#include <httplib.h>
#include <fcntl.h>
#include <signal.h>
#include <unistd.h>
#include <r1c/r1c.hpp>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <variant>
#include <vector>

using json = nlohmann::json;

namespace {

struct HttpError : std::runtime_error {
    int status;
    std::string type, code;
    json param;
    HttpError(int s, const std::string& msg, const std::string& t = "invalid_request_error", json p = nullptr,
              std::string c = "")
        : std::runtime_error(msg), status(s), type(t), code(std::move(c)), param(std::move(p)) {}
};

json error_body(const std::string& message, const std::string& type, const json& param, const std::string& code) {
    return {{"error", {{"message", message}, {"type", type}, {"param", param},
                       {"code", code.empty() ? json(nullptr) : json(code)}}}};
}

void send_json(httplib::Response& res, int status, const json& body) {
    res.status = status;
    res.set_content(body.dump(), "application/json");
}

long now_s() {
    return std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch())
        .count();
}

std::string completion_id() {
    static thread_local std::mt19937_64 rng{std::random_device{}()};
    char buf[40];
    std::snprintf(buf, sizeof buf, "cmpl-%016llx%016llx", static_cast<unsigned long long>(rng()),
                  static_cast<unsigned long long>(rng()));
    return buf;
}

// A field of the request: absent or null means "use the default".
template <typename T>
std::optional<T> field(const json& body, const char* name) {
    auto it = body.find(name);
    if (it == body.end() || it->is_null()) return std::nullopt;
    try {
        if constexpr (std::is_same_v<T, double>) {
            if (!it->is_number()) throw std::invalid_argument("a number");
        } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
            if (!it->is_number_integer()) throw std::invalid_argument("an integer");
        } else if constexpr (std::is_same_v<T, bool>) {
            if (!it->is_boolean()) throw std::invalid_argument("a boolean");
        }
        return it->get<T>();
    } catch (const std::exception&) {
        throw HttpError(400, std::string(name) + ": Input should be a valid " +
                                 (std::is_same_v<T, bool> ? "boolean" : std::is_integral_v<T> ? "integer" : "number"),
                        "invalid_request_error", name);
    }
}

struct Completion {
    std::variant<std::string, std::vector<int32_t>> prompt;
    r1c::Sampling sampling;
    int32_t logprobs = -1;
    bool stream = false;
    bool include_usage = false;
};

Completion parse(const json& body, const std::string& model_name) {
    if (!body.is_object()) throw HttpError(400, "Input should be a valid dictionary or object to extract fields from");
    if (!body.contains("model")) throw HttpError(400, "model: Field required", "invalid_request_error", "model");
    if (!body.contains("prompt")) throw HttpError(400, "prompt: Field required", "invalid_request_error", "prompt");
    if (!body["model"].is_string()) throw HttpError(400, "model: Input should be a valid string", "invalid_request_error", "model");
    std::string model = body["model"];
    if (model != model_name)
        throw HttpError(404, "The model `" + model + "` does not exist.", "invalid_request_error", "model",
                        "model_not_found");
    Completion c;
    json p = body["prompt"];
    if (p.is_array() && !p.empty() && (p[0].is_string() || p[0].is_array())) {
        if (p.size() != 1) throw HttpError(400, "send one prompt per request (a string or one list of token ids)");
        p = p[0];
    }
    if (p.is_string()) {
        c.prompt = p.get<std::string>();
    } else if (p.is_array()) {
        std::vector<int32_t> ids;
        for (const auto& t : p) {
            if (!t.is_number_integer()) throw HttpError(400, "prompt: Input should be a valid string or a list of integers",
                                                        "invalid_request_error", "prompt");
            ids.push_back(t.get<int32_t>());
        }
        if (ids.empty()) throw HttpError(400, "the prompt is empty (it needs at least one token)");
        c.prompt = ids;
    } else {
        throw HttpError(400, "prompt: Input should be a valid string or a list of integers", "invalid_request_error",
                        "prompt");
    }
    if (field<int64_t>(body, "n").value_or(1) != 1) throw HttpError(400, "n must be 1 (one choice per request)");
    if (field<bool>(body, "echo").value_or(false)) throw HttpError(400, "echo is not supported");
    if (auto b = field<int64_t>(body, "best_of"); b && *b != 1) throw HttpError(400, "best_of must be 1");
    if (body.contains("suffix") && body["suffix"].is_string() && !body["suffix"].get<std::string>().empty())
        throw HttpError(400, "suffix is not supported");
    if (body.contains("logit_bias") && body["logit_bias"].is_object() && !body["logit_bias"].empty())
        throw HttpError(400, "logit_bias is not supported");
    r1c::Sampling& s = c.sampling;
    s.max_tokens(static_cast<int32_t>(field<int64_t>(body, "max_tokens").value_or(16)));
    if (auto v = field<double>(body, "temperature")) s.temperature(*v);
    if (auto v = field<int64_t>(body, "top_k")) s.top_k(static_cast<int32_t>(*v));
    if (auto v = field<double>(body, "top_p")) s.top_p(*v);
    if (auto v = field<double>(body, "min_p")) s.min_p(*v);
    if (auto v = field<double>(body, "repetition_penalty")) s.repetition_penalty(*v);
    if (auto v = field<double>(body, "presence_penalty")) s.presence_penalty(*v);
    if (auto v = field<double>(body, "frequency_penalty")) s.frequency_penalty(*v);
    if (auto v = field<int64_t>(body, "seed")) {
        if (*v < 0) throw HttpError(400, "seed must be an integer in [0, 2^64), got " + std::to_string(*v));
        s.seed(static_cast<uint64_t>(*v));
    }
    if (auto v = field<bool>(body, "ignore_eos")) s.ignore_eos(*v);
    if (auto v = field<int64_t>(body, "logprobs")) {
        c.logprobs = static_cast<int32_t>(*v);
        s.logprobs(c.logprobs);
    }
    if (body.contains("stop") && !body["stop"].is_null()) {
        std::vector<std::string> stops;
        if (body["stop"].is_string()) stops.push_back(body["stop"]);
        else if (body["stop"].is_array())
            for (const auto& x : body["stop"]) {
                if (!x.is_string()) throw HttpError(400, "stop must be a string or a list of non-empty strings");
                stops.push_back(x);
            }
        else throw HttpError(400, "stop must be a string or a list of non-empty strings");
        s.stop(stops);
    }
    if (body.contains("stop_token_ids") && !body["stop_token_ids"].is_null()) {
        std::vector<int32_t> ids;
        for (const auto& x : body["stop_token_ids"]) {
            if (!x.is_number_integer()) throw HttpError(400, "stop_token_ids must be a list of integers");
            ids.push_back(x);
        }
        s.stop_token_ids(ids);
    }
    c.stream = field<bool>(body, "stream").value_or(false);
    if (body.contains("stream_options") && body["stream_options"].is_object())
        c.include_usage = body["stream_options"].value("include_usage", false);
    return c;
}

r1c::Request submit(r1c::Engine& engine, const Completion& c) {
    try {
        if (auto* text = std::get_if<std::string>(&c.prompt)) return engine.submit(*text, c.sampling);
        return engine.submit(std::get<std::vector<int32_t>>(c.prompt), c.sampling);
    } catch (const r1c::Error& e) {
        std::string msg = r1c_last_error();
        if (e.status() == R1C_ERR_OVER_CAPACITY && msg.find("more than the cache holds") == std::string::npos)
            throw HttpError(503, msg, "server_error", nullptr, "over_capacity");
        throw HttpError(400, msg, "invalid_request_error",
                        e.status() == R1C_ERR_OVER_CAPACITY ? json("max_tokens") : json(nullptr));
    }
}

// The response of one request, as r1c serve's protocol.Formatter writes it.
struct Formatter {
    r1c::Engine& engine;
    std::string model, id = completion_id();
    long created = now_s();
    size_t offset = 0;

    json head() const { return {{"id", id}, {"object", "text_completion"}, {"created", created}, {"model", model}}; }

    json logprobs(const std::vector<r1c::Token>& toks, int32_t requested) {
        json tokens = json::array(), lps = json::array(), offsets = json::array();
        json tops = requested > 0 ? json::array() : json(nullptr);
        for (const auto& t : toks) {
            tokens.push_back(engine.token_str(t.id));
            lps.push_back(t.logprob);
            offsets.push_back(offset);
            offset += utf8_chars(t.text);
            if (requested > 0) {
                json top = json::object();
                for (const auto& [i, v] : t.top) top[engine.token_str(i)] = v;
                tops.push_back(top);
            }
        }
        return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offsets}};
    }

    static size_t utf8_chars(const std::string& s) {  // text offsets count characters, as Python's len() does
        size_t n = 0;
        for (unsigned char ch : s) n += (ch & 0xC0) != 0x80;
        return n;
    }

    json chunk(const r1c::Token& t, int32_t requested) {
        json ids = json::array();
        if (t.id >= 0) ids.push_back(t.id);
        json lp = (requested >= 0 && t.id >= 0) ? logprobs({t}, requested) : json(nullptr);
        json choice = {{"index", 0}, {"finish_reason", t.finish_reason ? json(*t.finish_reason) : json(nullptr)},
                       {"logprobs", lp}, {"token_ids", ids}, {"text", t.text}};
        json out = head();
        out["choices"] = json::array({choice});
        return out;
    }

    static json usage(const r1c::Result& r) {
        int32_t n = r.prompt_tokens, m = static_cast<int32_t>(r.token_ids.size());
        return {{"prompt_tokens", n}, {"completion_tokens", m}, {"total_tokens", n + m}};
    }

    json whole(const r1c::Result& r, const std::vector<r1c::Token>& toks, int32_t requested) {
        json choice = {{"index", 0}, {"finish_reason", r.finish_reason},
                       {"logprobs", requested >= 0 ? logprobs(toks, requested) : json(nullptr)},
                       {"token_ids", r.token_ids}, {"text", r.text}};
        json out = head();
        out["choices"] = json::array({choice});
        out["usage"] = usage(r);
        return out;
    }
};

// SIGINT/SIGTERM: the handler only write()s the signal number to a pipe (async-signal-safe); a watcher thread
// reads it and stops the server. The embedded Python installs no handlers of its own (the C ABI starts it with
// install_signal_handlers = 0), so these are the process's.
int g_signal_pipe[2] = {-1, -1};
std::atomic<bool> g_listen_returned{false};

extern "C" void on_stop_signal(int sig) {
    int saved = errno;
    unsigned char b = static_cast<unsigned char>(sig);
    [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &b, 1);
    errno = saved;
}

// Starts the watcher: on the first SIGINT/SIGTERM it calls svr.stop() (once listen has started: stop() before that
// would be a no-op), or it returns when the pipe gets byte 0 (main's, once listen returned). Nothing when the pipe
// cannot be made.
std::optional<std::thread> watch_stop_signals(httplib::Server& svr) {
    if (pipe2(g_signal_pipe, O_CLOEXEC) != 0) return std::nullopt;  // not inherited by a sharded bundle's ranks
    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGINT, &sa, nullptr);  // also when started with SIGINT ignored (a background job of a shell)
    sigaction(SIGTERM, &sa, nullptr);
    return std::thread([&svr] {
        unsigned char b = 0;
        while (read(g_signal_pipe[0], &b, 1) < 0 && errno == EINTR) {
        }
        if (b == 0) return;
        signal(SIGINT, SIG_DFL);  // a second Ctrl-C while the held requests finish ends the process at once
        signal(SIGTERM, SIG_DFL);
        std::cerr << "r1c_cpp_server: " << (b == SIGINT ? "SIGINT" : "SIGTERM") << ", stopping\n";
        while (!g_listen_returned) {
            if (svr.is_running()) {
                svr.stop();
                return;
            }
            std::this_thread::sleep_for(std::chrono::milliseconds(5));
        }
    });
}

}  // namespace

int main(int argc, char** argv) {
    std::string bundle, host = "127.0.0.1", model_name, options;
    int port = 8000;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw std::invalid_argument(a + " needs a value");
            return argv[++i];
        };
        try {
            if (a == "--port") port = std::stoi(value());
            else if (a == "--host") host = value();
            else if (a == "--model-name") model_name = value();
            else if (a == "--options") options = value();
            else if (a == "-h" || a == "--help") {
                std::cout << "usage: " << argv[0] << " BUNDLE --port N [--host H] [--model-name NAME] [--options JSON]\n";
                return 0;
            } else if (bundle.empty() && a.rfind("-", 0) != 0) bundle = a;
            else throw std::invalid_argument("unknown argument " + a);
        } catch (const std::exception& e) {
            std::cerr << "r1c_cpp_server: " << e.what() << "\n";
            return 2;
        }
    }
    if (bundle.empty()) {
        std::cerr << "usage: " << argv[0] << " BUNDLE --port N [--host H] [--model-name NAME] [--options JSON]\n";
        return 2;
    }
    if (model_name.empty()) model_name = std::filesystem::weakly_canonical(bundle).filename().string();

    std::unique_ptr<r1c::Engine> engine;
    try {
        engine = std::make_unique<r1c::Engine>(bundle, options);
    } catch (const r1c::Error& e) {
        std::cerr << "r1c_cpp_server: " << e.what() << "\n";
        return 1;
    }

    httplib::Server svr;
    svr.new_task_queue = [] { return new httplib::ThreadPool(64); };
    svr.Get("/health", [](const httplib::Request&, httplib::Response& res) {
        send_json(res, 200, {{"status", "ok"}});
    });
    svr.Get("/v1/models", [&](const httplib::Request&, httplib::Response& res) {
        send_json(res, 200, {{"object", "list"},
                             {"data", json::array({{{"id", model_name}, {"object", "model"}, {"created", now_s()},
                                                    {"owned_by", "r1c"}}})}});
    });
    svr.Post("/v1/completions", [&](const httplib::Request& req, httplib::Response& res) {
        try {
            json body;
            try {
                body = json::parse(req.body);
            } catch (const json::parse_error& e) {
                throw HttpError(400, std::string("the request body is not valid JSON: ") + e.what());
            }
            Completion c = parse(body, model_name);
            auto request = std::make_shared<r1c::Request>(submit(*engine, c));
            auto fmt = std::make_shared<Formatter>(Formatter{*engine, model_name});
            if (!c.stream) {
                std::vector<r1c::Token> toks;
                while (auto t = request->next())
                    if (t->id >= 0) toks.push_back(*t);
                send_json(res, 200, fmt->whole(request->wait(), toks, c.logprobs));
                return;
            }
            res.set_header("Cache-Control", "no-cache");
            res.set_chunked_content_provider("text/event-stream", [request, fmt, c](size_t, httplib::DataSink& sink) {
                auto send = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
                try {
                    while (auto t = request->next()) {
                        if (!send("data: " + fmt->chunk(*t, c.logprobs).dump() + "\n\n")) {
                            request->cancel();  // the client went away
                            return false;
                        }
                    }
                    if (c.include_usage) {
                        json u = fmt->head();
                        u["choices"] = json::array();
                        u["usage"] = Formatter::usage(request->wait());
                        send("data: " + u.dump() + "\n\n");
                    }
                    send("data: [DONE]\n\n");
                } catch (const r1c::Error& e) {
                    send("data: " + error_body(r1c_last_error(), "server_error", nullptr, "").dump() + "\n\n");
                }
                sink.done();
                return true;
            });
        } catch (const HttpError& e) {
            send_json(res, e.status, error_body(e.what(), e.type, e.param, e.code));
        } catch (const r1c::Error& e) {
            send_json(res, 500, error_body(e.what(), "server_error", nullptr, ""));
        }
    });
    svr.set_error_handler([](const httplib::Request&, httplib::Response& res) {
        if (res.body.empty()) {
            std::string msg = res.status == 404 ? "Not Found" : "HTTP " + std::to_string(res.status);
            send_json(res, res.status, error_body(msg, res.status < 500 ? "invalid_request_error" : "server_error",
                                                  nullptr, ""));
        }
    });
    if (!svr.bind_to_port(host.c_str(), port)) {
        std::cerr << "r1c_cpp_server: cannot listen on " << host << ":" << port << "\n";
        return 1;
    }
    auto watcher = watch_stop_signals(svr);
    std::cerr << "r1c_cpp_server: serving " << model_name << " on http://" << host << ":" << port << "\n";
    bool ok = svr.listen_after_bind();  // returns once svr.stop() ran (or the socket failed)
    g_listen_returned = true;
    if (watcher) {
        unsigned char zero = 0;  // wakes the watcher if no signal came
        [[maybe_unused]] ssize_t n = write(g_signal_pipe[1], &zero, 1);
        watcher->join();
    }
    engine.reset();  // r1c_close: stops the engine's scheduler and frees it through the C ABI
    if (!ok) {
        std::cerr << "r1c_cpp_server: the server on " << host << ":" << port << " failed\n";
        return 1;
    }
    std::cerr << "r1c_cpp_server: stopped\n";
    return 0;
}
