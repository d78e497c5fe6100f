/*
 * r1c_capi_probe: exercise the C ABI from C, as a C program would, and print JSON lines.
 *   r1c_capi_probe errors BUNDLE              bad arguments: one {"case", "status", "message"} line per case
 *   r1c_capi_probe generate BUNDLE N ID...    greedy, N tokens: {"streamed": [...], "token_ids": [...], "text": ...}
 */
#include <r1c/r1c.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void json_str(const char* s) {
    putchar('"');
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') printf("\\%c", c);
        else if (c < 0x20) printf("\\u%04x", c);
        else putchar(c);
    }
    putchar('"');
}

static void report(const char* name, r1c_status st) {
    printf("{\"case\": ");
    json_str(name);
    printf(", \"status\": ");
    json_str(r1c_status_name(st));
    printf(", \"message\": ");
    json_str(r1c_last_error());
    printf("}\n");
}

static int errors(const char* bundle) {
    r1c_engine* e = NULL;
    r1c_request* r = NULL;
    r1c_sampling p;
    int32_t ids[3] = {5, 6, 7};
    report("open_null_bundle", r1c_open(NULL, NULL, &e));
    report("open_null_out", r1c_open(bundle, NULL, NULL));
    report("open_missing_bundle", r1c_open("/nonexistent/r1c-bundle", NULL, &e));
    report("open_bad_json", r1c_open(bundle, "{not json", &e));
    report("open_unknown_option", r1c_open(bundle, "{\"bogus\": 1}", &e));
    r1c_status st = r1c_open(bundle, "{\"max_num_seqs\": 1, \"max_queue\": 1, \"kv_cache_bytes\": \"64KiB\"}", &e);
    report("open_ok", st);
    if (st != R1C_OK) return 1;
    report("submit_null_engine", r1c_submit_ids(NULL, ids, 3, NULL, &r));
    report("submit_null_ids", r1c_submit_ids(e, NULL, 3, NULL, &r));
    report("submit_null_out", r1c_submit_ids(e, ids, 3, NULL, NULL));
    report("submit_empty_prompt", r1c_submit_ids(e, ids, 0, NULL, &r));
    int32_t bad_id = 1 << 30;
    report("submit_id_out_of_range", r1c_submit_ids(e, &bad_id, 1, NULL, &r));
    memset(&p, 0, sizeof p);
    report("submit_uninitialized_sampling", r1c_submit_ids(e, ids, 3, &p, &r));
    r1c_sampling_init(&p);
    p.temperature = -1.0;
    report("submit_bad_temperature", r1c_submit_ids(e, ids, 3, &p, &r));
    r1c_sampling_init(&p);
    p.n_stop = 2;
    report("submit_null_stop_list", r1c_submit_ids(e, ids, 3, &p, &r));
    r1c_sampling_init(&p);
    p.max_tokens = 400;
    report("submit_never_fits", r1c_submit_ids(e, ids, 3, &p, &r));
    report("submit_bad_utf8", r1c_submit_text(e, "\xff\xfe not utf-8", NULL, &r));
    report("next_null", r1c_next(NULL, 0, NULL));
    report("wait_null", r1c_wait(NULL, 0, NULL));
    report("cancel_null", r1c_cancel(NULL));
    char buf[8];
    report("token_str_out_of_range", r1c_token_str(e, -5, buf, sizeof buf, NULL));
    report("info_null", r1c_engine_info(e, NULL));
    /* queue full: one running, one waiting (max_queue 1), the third is refused */
    r1c_request *a = NULL, *b = NULL, *c = NULL;
    r1c_sampling_init(&p);
    p.max_tokens = 40;
    p.ignore_eos = 1;
    r1c_token t;
    report("submit_running", r1c_submit_ids(e, ids, 3, &p, &a));
    if (a) r1c_next(a, -1, &t); /* it holds the only row now */
    report("submit_waiting", r1c_submit_ids(e, ids, 3, &p, &b));
    report("submit_queue_full", r1c_submit_ids(e, ids, 3, &p, &c));
    if (b == NULL) return 1;
    report("next_zero_timeout_on_waiting", r1c_next(b, 0, &t));
    report("cancel_waiting", r1c_cancel(b));
    r1c_result res;
    st = r1c_wait(b, 10000, &res);
    report("wait_cancelled", st);
    printf("{\"case\": \"cancelled_finish_reason\", \"status\": \"R1C_OK\", \"message\": ");
    json_str(st == R1C_OK ? res.finish_reason : "");
    printf("}\n");
    r1c_request_free(a);
    r1c_request_free(b);
    r1c_request_free(c);
    report("close", r1c_close(e));
    report("close_null", r1c_close(NULL));
    return 0;
}

static int generate(const char* bundle, int n, int argc, char** argv) {
    r1c_engine* e = NULL;
    if (r1c_open(bundle, "{\"threads\": 1}", &e) != R1C_OK) {
        fprintf(stderr, "%s\n", r1c_last_error());
        return 1;
    }
    int32_t* ids = calloc((size_t)argc, sizeof *ids);
    for (int i = 0; i < argc; i++) ids[i] = atoi(argv[i]);
    r1c_sampling p;
    r1c_sampling_init(&p);
    p.max_tokens = n;
    p.temperature = 0.0;
    p.ignore_eos = 1;
    r1c_request* r = NULL;
    if (r1c_submit_ids(e, ids, (size_t)argc, &p, &r) != R1C_OK) {
        fprintf(stderr, "%s\n", r1c_last_error());
        return 1;
    }
    printf("{\"streamed\": [");
    r1c_token t;
    int first = 1;
    r1c_status st;
    while ((st = r1c_next(r, -1, &t)) == R1C_OK) {
        printf("%s%d", first ? "" : ", ", t.token_id);
        first = 0;
    }
    r1c_result res;
    r1c_wait(r, -1, &res);
    printf("], \"end\": ");
    json_str(r1c_status_name(st));
    printf(", \"token_ids\": [");
    for (int i = 0; i < res.n_tokens; i++) printf("%s%d", i ? ", " : "", res.token_ids[i]);
    printf("], \"finish_reason\": ");
    json_str(res.finish_reason);
    printf(", \"prompt_tokens\": %d}\n", res.n_prompt_tokens);
    r1c_request_free(r);
    free(ids);
    return r1c_close(e) == R1C_OK ? 0 : 1;
}

int main(int argc, char** argv) {
    if (argc >= 3 && strcmp(argv[1], "errors") == 0) return errors(argv[2]);
    if (argc >= 5 && strcmp(argv[1], "generate") == 0) return generate(argv[2], atoi(argv[3]), argc - 4, argv + 4);
    fprintf(stderr, "usage: %s errors BUNDLE | generate BUNDLE N ID...\n", argv[0]);
    return 2;
}
