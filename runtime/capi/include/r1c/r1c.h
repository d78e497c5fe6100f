/*
 * r1c C ABI: open an engine bundle, submit requests, stream their tokens, cancel, wait, close.
 *
 * Implementation: an embedded CPython interpreter running r1c's own scheduler (r1c.runtime.serving), so C, C++
 * and Python callers share one scheduler, one sampler and one cache. The interpreter starts on the first
 * r1c_open (the Python that built the library, or $R1C_PYTHON) and lives until the process exits; a host that
 * already runs Python (ctypes) is joined instead. No exception or traceback crosses this boundary: every call
 * returns an r1c_status, and r1c_last_error() has the message.
 *
 * Threads: every function may be called from any thread. One request's r1c_next / r1c_wait must not run on two
 * threads at once (they return pointers into the request); different requests are independent.
 * Ownership: r1c_request_free frees a request (cancelling it if it still runs); r1c_close cancels the engine's
 * requests and frees the engine; its requests stay readable until freed.
 */
#ifndef R1C_H
#define R1C_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define R1C_ABI_VERSION 1

#if defined(__GNUC__)
#define R1C_API __attribute__((visibility("default")))
#else
#define R1C_API
#endif

typedef enum r1c_status {
    R1C_OK = 0,
    R1C_END = 1,                  /* r1c_next: the request has no more events (not an error) */
    R1C_ERR_INVALID_ARGUMENT = 2, /* a NULL pointer, a bad parameter or prompt, bad options JSON */
    R1C_ERR_BUNDLE = 3,           /* the bundle is missing, corrupt or does not match this library/device */
    R1C_ERR_OVER_CAPACITY = 4,    /* the waiting queue is full, or the request can never fit the cache */
    R1C_ERR_TIMEOUT = 5,          /* r1c_next / r1c_wait: nothing within timeout_ms */
    R1C_ERR_CLOSED = 6,           /* the engine is closed */
    R1C_ERR_RUNTIME = 7,          /* the model failed while running the request */
    R1C_ERR_PYTHON = 8,           /* the embedded interpreter could not start or import r1c */
    R1C_ERR_INTERNAL = 9          /* anything else (the message says what) */
} r1c_status;

typedef struct r1c_engine r1c_engine;
typedef struct r1c_request r1c_request;

/* The calling thread's last error message ("" if none); valid until this thread's next r1c call. */
R1C_API const char* r1c_last_error(void);
R1C_API const char* r1c_status_name(r1c_status status);
R1C_API int r1c_abi_version(void);

/* Open a bundle. options_json: NULL or a JSON object with any of max_num_seqs, max_tokens_per_step,
 * kv_cache_bytes (e.g. "1GiB" or a number), max_model_len, max_queue, threads (ONNX Runtime intra-op). */
R1C_API r1c_status r1c_open(const char* bundle_dir, const char* options_json, r1c_engine** out);
R1C_API r1c_status r1c_close(r1c_engine* engine);

typedef struct r1c_info {
    int32_t vocab_size;
    int32_t max_model_len;
    int32_t has_tokenizer;     /* text prompts and text output */
    int32_t has_chat_template;
} r1c_info;
R1C_API r1c_status r1c_engine_info(r1c_engine* engine, r1c_info* out);

/* A token's own text (as logprobs show it) into buf (NUL-terminated, truncated to cap); *len = full length. */
R1C_API r1c_status r1c_token_str(r1c_engine* engine, int32_t token_id, char* buf, size_t cap, size_t* len);

/* Sampling parameters; r1c_sampling_init sets the defaults (OpenAI's: max_tokens 16, temperature 1). */
typedef struct r1c_sampling {
    size_t struct_size;           /* sizeof(r1c_sampling), set by r1c_sampling_init */
    int32_t max_tokens;
    double temperature;           /* 0: greedy */
    int32_t top_k;                /* 0: off */
    double top_p;                 /* 1: off */
    double min_p;                 /* 0: off */
    double repetition_penalty;    /* 1: off */
    double presence_penalty;      /* 0: off */
    double frequency_penalty;     /* 0: off */
    int32_t has_seed;
    uint64_t seed;
    const int32_t* stop_token_ids;
    size_t n_stop_token_ids;
    const char* const* stop;      /* UTF-8 stop strings (need a tokenizer) */
    size_t n_stop;
    int32_t ignore_eos;
    int32_t logprobs;             /* -1: none; 0: the chosen token's; n > 0: also the n most likely */
} r1c_sampling;
R1C_API void r1c_sampling_init(r1c_sampling* params);

/* Queue a request (never blocks on the model). params may be NULL (defaults). */
R1C_API r1c_status r1c_submit_ids(r1c_engine* engine, const int32_t* ids, size_t n_ids, const r1c_sampling* params,
                                  r1c_request** out);
R1C_API r1c_status r1c_submit_text(r1c_engine* engine, const char* text_utf8, const r1c_sampling* params,
                                   r1c_request** out);

/* One generated token. Pointers stay valid until the next r1c_next / r1c_wait / r1c_request_free on the request. */
typedef struct r1c_token {
    int32_t index;               /* position in the output */
    int32_t token_id;            /* -1 on a last event that carries no token (a cancelled request) */
    const char* text;            /* UTF-8 text this token releases ("" while a stop string may still match) */
    size_t text_len;
    double logprob;              /* NaN unless logprobs >= 0 */
    int32_t n_top;               /* logprobs > 0: the most likely tokens and their logprobs */
    const int32_t* top_ids;
    const double* top_logprobs;
    const char* finish_reason;   /* NULL while running; "stop", "length" or "cancelled" on the last event */
} r1c_token;

/* The next event: R1C_OK (out filled), R1C_END (no more), R1C_ERR_TIMEOUT, or an error.
 * timeout_ms < 0 waits as long as it takes. */
R1C_API r1c_status r1c_next(r1c_request* request, int32_t timeout_ms, r1c_token* out);

typedef struct r1c_result {
    int32_t n_prompt_tokens;
    int32_t n_tokens;
    const int32_t* token_ids;
    const char* text;            /* the whole output text (UTF-8) */
    size_t text_len;
    const char* finish_reason;   /* "stop", "length" or "cancelled" */
} r1c_result;

/* Wait for the end (consuming the remaining events); pointers valid until r1c_request_free. */
R1C_API r1c_status r1c_wait(r1c_request* request, int32_t timeout_ms, r1c_result* out);
/* Stop the request; its cache is freed at the next step boundary. Safe on a finished request. */
R1C_API r1c_status r1c_cancel(r1c_request* request);
R1C_API void r1c_request_free(r1c_request* request);

#ifdef __cplusplus
}
#endif

#endif /* R1C_H */
