/*
 * libr1c: the C ABI of include/r1c/r1c.h over an embedded CPython interpreter.
 *
 * Each call takes the GIL (PyGILState_Ensure), calls one function of r1c.runtime.capi.bridge, which returns
 * (status, message, value) and never raises, and copies the value into C memory owned by the request or the
 * caller's struct. Python releases the GIL while a call waits (r1c_next, r1c_wait), so C threads never block
 * each other on a wait. Messages go to a thread-local buffer read by r1c_last_error().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "r1c/r1c.h"

#ifndef R1C_PYTHON_EXECUTABLE
#define R1C_PYTHON_EXECUTABLE "python3"
#endif

#define ERR_CAP 4096

static _Thread_local char tl_err[ERR_CAP];

static r1c_status fail(r1c_status st, const char* msg) {
    snprintf(tl_err, ERR_CAP, "%s", msg);
    return st;
}

/* ---- the interpreter and the bridge functions ---------------------------------------------------------- */
enum { F_OPEN, F_CLOSE, F_INFO, F_TOKEN_STR, F_SUBMIT, F_NEXT, F_WAIT, F_CANCEL, F_COUNT };
static const char* const FN_NAMES[F_COUNT] = {"open_engine", "close_engine", "info", "token_str",
                                              "submit", "next_event", "wait", "cancel"};
static PyObject* g_fn[F_COUNT];
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static r1c_status g_init_status = R1C_OK;
static char g_init_err[ERR_CAP];

/* Message of the pending Python exception (cleared); GIL held. */
static void python_error(char* buf, size_t cap, const char* what) {
    PyObject *type = NULL, *value = NULL, *tb = NULL;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyObject* s = value ? PyObject_Str(value) : NULL;
    const char* msg = s ? PyUnicode_AsUTF8(s) : NULL;
    snprintf(buf, cap, "%s: %s: %s", what, type ? ((PyTypeObject*)type)->tp_name : "error", msg ? msg : "?");
    Py_XDECREF(s);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    PyErr_Clear();
}

static void init_once(void) {
    int started_here = 0;
    if (!Py_IsInitialized()) {
        const char* exe = getenv("R1C_PYTHON");
        if (exe == NULL || *exe == '\0') exe = R1C_PYTHON_EXECUTABLE;
        PyConfig config;
        PyConfig_InitPythonConfig(&config);
        config.install_signal_handlers = 0; /* the host owns its signals */
        config.parse_argv = 0;
        PyStatus st = PyConfig_SetBytesString(&config, &config.program_name, exe); /* finds the venv */
        if (!PyStatus_Exception(st)) st = Py_InitializeFromConfig(&config);
        PyConfig_Clear(&config);
        if (PyStatus_Exception(st)) {
            snprintf(g_init_err, ERR_CAP, "cannot start the Python interpreter of %s: %s", exe,
                     st.err_msg ? st.err_msg : "unknown error");
            g_init_status = R1C_ERR_PYTHON;
            return;
        }
        started_here = 1;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* mod = PyImport_ImportModule("r1c.runtime.capi.bridge");
    if (mod == NULL) {
        python_error(g_init_err, ERR_CAP, "cannot import r1c (is it installed for this Python? set R1C_PYTHON)");
        g_init_status = R1C_ERR_PYTHON;
    } else {
        for (int i = 0; i < F_COUNT; i++) {
            g_fn[i] = PyObject_GetAttrString(mod, FN_NAMES[i]);
            if (g_fn[i] == NULL) {
                python_error(g_init_err, ERR_CAP, "r1c.runtime.capi.bridge is incomplete");
                g_init_status = R1C_ERR_PYTHON;
                break;
            }
        }
        Py_DECREF(mod);
    }
    PyGILState_Release(gil);
    if (started_here) PyEval_SaveThread(); /* hand the GIL to whoever needs it; this thread keeps no lock */
}

static r1c_status ensure_python(void) {
    pthread_once(&g_once, init_once);
    if (g_init_status != R1C_OK) return fail(g_init_status, g_init_err);
    return R1C_OK;
}

/* Call bridge function `fn` with `args` (a new reference, consumed). On R1C_OK, *value is a new reference
 * (or NULL if value is NULL). GIL held. */
static r1c_status call(int fn, PyObject* args, PyObject** value) {
    if (value) *value = NULL;
    if (args == NULL) {
        python_error(tl_err, ERR_CAP, "r1c: cannot build the call's arguments");
        return R1C_ERR_INTERNAL;
    }
    PyObject* res = PyObject_CallObject(g_fn[fn], args);
    Py_DECREF(args);
    if (res == NULL) {
        python_error(tl_err, ERR_CAP, FN_NAMES[fn]);
        return R1C_ERR_INTERNAL;
    }
    int status = 0;
    const char* msg = NULL;
    PyObject* val = NULL;
    if (!PyArg_ParseTuple(res, "isO", &status, &msg, &val)) {
        python_error(tl_err, ERR_CAP, "r1c: malformed bridge result");
        Py_DECREF(res);
        return R1C_ERR_INTERNAL;
    }
    if (status != R1C_OK) {
        snprintf(tl_err, ERR_CAP, "%s", msg);
    } else if (value) {
        Py_INCREF(val);
        *value = val;
    }
    Py_DECREF(res);
    return (r1c_status)status;
}

/* ---- small buffers ----------------------------------------------------------------------------------- */
static int grow(void** buf, size_t* cap, size_t need, size_t elem) {
    if (need <= *cap) return 1;
    size_t n = *cap ? *cap : 64;
    while (n < need) n *= 2;
    void* p = realloc(*buf, n * elem);
    if (p == NULL) return 0;
    *buf = p;
    *cap = n;
    return 1;
}

static int copy_text(char** buf, size_t* cap, const char* s, Py_ssize_t n) {
    if (!grow((void**)buf, cap, (size_t)n + 1, 1)) return 0;
    memcpy(*buf, s, (size_t)n);
    (*buf)[n] = '\0';
    return 1;
}

/* ---- handles ------------------------------------------------------------------------------------------- */
struct r1c_engine {
    PyObject* obj;
};

struct r1c_request {
    PyObject* handle;
    char* text;
    size_t text_cap;
    int32_t* top_ids;
    size_t top_ids_cap;
    double* top_lps;
    size_t top_lps_cap;
    char finish[16];
    int32_t* ids;
    size_t ids_cap;
    char* all_text;
    size_t all_text_cap;
    char result_finish[16];
};

const char* r1c_last_error(void) { return tl_err; }

int r1c_abi_version(void) { return R1C_ABI_VERSION; }

const char* r1c_status_name(r1c_status s) {
    switch (s) {
        case R1C_OK: return "R1C_OK";
        case R1C_END: return "R1C_END";
        case R1C_ERR_INVALID_ARGUMENT: return "R1C_ERR_INVALID_ARGUMENT";
        case R1C_ERR_BUNDLE: return "R1C_ERR_BUNDLE";
        case R1C_ERR_OVER_CAPACITY: return "R1C_ERR_OVER_CAPACITY";
        case R1C_ERR_TIMEOUT: return "R1C_ERR_TIMEOUT";
        case R1C_ERR_CLOSED: return "R1C_ERR_CLOSED";
        case R1C_ERR_RUNTIME: return "R1C_ERR_RUNTIME";
        case R1C_ERR_PYTHON: return "R1C_ERR_PYTHON";
        case R1C_ERR_INTERNAL: return "R1C_ERR_INTERNAL";
    }
    return "R1C_UNKNOWN_STATUS";
}

r1c_status r1c_open(const char* bundle_dir, const char* options_json, r1c_engine** out) {
    tl_err[0] = '\0';
    if (out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_open: out is NULL");
    *out = NULL;
    if (bundle_dir == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_open: bundle_dir is NULL");
    r1c_status st = ensure_python();
    if (st != R1C_OK) return st;
    r1c_engine* e = calloc(1, sizeof *e);
    if (e == NULL) return fail(R1C_ERR_INTERNAL, "r1c_open: out of memory");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* opts = options_json ? PyUnicode_FromString(options_json) : (Py_INCREF(Py_None), Py_None);
    st = opts == NULL ? R1C_ERR_INVALID_ARGUMENT
                      : call(F_OPEN, Py_BuildValue("(NN)", PyUnicode_DecodeFSDefault(bundle_dir), opts), &e->obj);
    if (opts == NULL) python_error(tl_err, ERR_CAP, "r1c_open: options_json is not UTF-8");
    PyGILState_Release(gil);
    if (st != R1C_OK) {
        free(e);
        return st;
    }
    *out = e;
    return R1C_OK;
}

r1c_status r1c_close(r1c_engine* engine) {
    tl_err[0] = '\0';
    if (engine == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_close: engine is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    r1c_status st = call(F_CLOSE, Py_BuildValue("(O)", engine->obj), NULL);
    Py_DECREF(engine->obj);
    PyGILState_Release(gil);
    free(engine);
    return st;
}

r1c_status r1c_engine_info(r1c_engine* engine, r1c_info* out) {
    tl_err[0] = '\0';
    if (engine == NULL || out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_engine_info: NULL argument");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* v = NULL;
    r1c_status st = call(F_INFO, Py_BuildValue("(O)", engine->obj), &v);
    if (st == R1C_OK && !PyArg_ParseTuple(v, "iiii", &out->vocab_size, &out->max_model_len, &out->has_tokenizer,
                                          &out->has_chat_template)) {
        python_error(tl_err, ERR_CAP, "r1c_engine_info");
        st = R1C_ERR_INTERNAL;
    }
    Py_XDECREF(v);
    PyGILState_Release(gil);
    return st;
}

r1c_status r1c_token_str(r1c_engine* engine, int32_t token_id, char* buf, size_t cap, size_t* len) {
    tl_err[0] = '\0';
    if (engine == NULL || (buf == NULL && cap > 0)) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_token_str: NULL argument");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* v = NULL;
    r1c_status st = call(F_TOKEN_STR, Py_BuildValue("(Oi)", engine->obj, token_id), &v);
    if (st == R1C_OK) {
        const char* s = PyBytes_AsString(v);
        size_t n = (size_t)PyBytes_Size(v);
        if (len) *len = n;
        if (cap > 0) {
            size_t k = n < cap - 1 ? n : cap - 1;
            memcpy(buf, s, k);
            buf[k] = '\0';
        }
    }
    Py_XDECREF(v);
    PyGILState_Release(gil);
    return st;
}

void r1c_sampling_init(r1c_sampling* p) {
    if (p == NULL) return;
    memset(p, 0, sizeof *p);
    p->struct_size = sizeof *p;
    p->max_tokens = 16;
    p->temperature = 1.0;
    p->top_p = 1.0;
    p->repetition_penalty = 1.0;
    p->logprobs = -1;
}

/* The bridge's parameter tuple, or NULL with tl_err set (GIL held). */
static PyObject* params_tuple(const r1c_sampling* p, r1c_status* st) {
    *st = R1C_ERR_INVALID_ARGUMENT;
    if (p->struct_size != sizeof *p) {
        fail(R1C_ERR_INVALID_ARGUMENT, "r1c_sampling: struct_size is wrong (call r1c_sampling_init first)");
        return NULL;
    }
    if ((p->n_stop_token_ids && p->stop_token_ids == NULL) || (p->n_stop && p->stop == NULL)) {
        fail(R1C_ERR_INVALID_ARGUMENT, "r1c_sampling: a stop list is NULL but its count is not 0");
        return NULL;
    }
    PyObject* ids = PyList_New((Py_ssize_t)p->n_stop_token_ids);
    PyObject* stops = PyList_New((Py_ssize_t)p->n_stop);
    if (ids == NULL || stops == NULL) goto oom;
    for (size_t i = 0; i < p->n_stop_token_ids; i++) PyList_SET_ITEM(ids, i, PyLong_FromLong(p->stop_token_ids[i]));
    for (size_t i = 0; i < p->n_stop; i++) {
        if (p->stop[i] == NULL) {
            Py_DECREF(ids);
            Py_DECREF(stops);
            fail(R1C_ERR_INVALID_ARGUMENT, "r1c_sampling: a stop string is NULL");
            return NULL;
        }
        PyList_SET_ITEM(stops, i, PyBytes_FromString(p->stop[i]));
    }
    PyObject* seed = p->has_seed ? PyLong_FromUnsignedLongLong(p->seed) : (Py_INCREF(Py_None), Py_None);
    *st = R1C_OK;
    return Py_BuildValue("(ididddddNNNii)", p->max_tokens, p->temperature, p->top_k, p->top_p, p->min_p,
                         p->repetition_penalty, p->presence_penalty, p->frequency_penalty, seed, ids, stops,
                         p->ignore_eos, p->logprobs);
oom:
    Py_XDECREF(ids);
    Py_XDECREF(stops);
    fail(R1C_ERR_INTERNAL, "r1c_sampling: out of memory");
    *st = R1C_ERR_INTERNAL;
    return NULL;
}

static r1c_status submit(r1c_engine* engine, PyObject* ids, PyObject* text, const r1c_sampling* p, r1c_request** out) {
    r1c_status st = R1C_OK;
    PyObject* params = p ? params_tuple(p, &st) : (Py_INCREF(Py_None), Py_None);
    if (params == NULL || ids == NULL || text == NULL) {
        Py_XDECREF(params);
        Py_XDECREF(ids);
        Py_XDECREF(text);
        return st != R1C_OK ? st : fail(R1C_ERR_INTERNAL, "r1c_submit: out of memory");
    }
    r1c_request* r = calloc(1, sizeof *r);
    if (r == NULL) {
        Py_DECREF(params);
        Py_DECREF(ids);
        Py_DECREF(text);
        return fail(R1C_ERR_INTERNAL, "r1c_submit: out of memory");
    }
    st = call(F_SUBMIT, Py_BuildValue("(ONNN)", engine->obj, ids, text, params), &r->handle);
    if (st != R1C_OK) {
        free(r);
        return st;
    }
    *out = r;
    return R1C_OK;
}

r1c_status r1c_submit_ids(r1c_engine* engine, const int32_t* ids, size_t n_ids, const r1c_sampling* params,
                          r1c_request** out) {
    tl_err[0] = '\0';
    if (out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_submit_ids: out is NULL");
    *out = NULL;
    if (engine == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_submit_ids: engine is NULL");
    if (ids == NULL && n_ids > 0) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_submit_ids: ids is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* list = PyList_New((Py_ssize_t)n_ids);
    for (size_t i = 0; list && i < n_ids; i++) PyList_SET_ITEM(list, i, PyLong_FromLong(ids[i]));
    Py_INCREF(Py_None);
    r1c_status st = submit(engine, list, Py_None, params, out);
    PyGILState_Release(gil);
    return st;
}

r1c_status r1c_submit_text(r1c_engine* engine, const char* text_utf8, const r1c_sampling* params, r1c_request** out) {
    tl_err[0] = '\0';
    if (out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_submit_text: out is NULL");
    *out = NULL;
    if (engine == NULL || text_utf8 == NULL)
        return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_submit_text: engine or text is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_INCREF(Py_None);
    r1c_status st = submit(engine, Py_None, PyBytes_FromString(text_utf8), params, out);
    PyGILState_Release(gil);
    return st;
}

static PyObject* timeout_arg(int32_t timeout_ms) {
    if (timeout_ms < 0) {
        Py_INCREF(Py_None);
        return Py_None;
    }
    return PyFloat_FromDouble(timeout_ms / 1000.0);
}

r1c_status r1c_next(r1c_request* r, int32_t timeout_ms, r1c_token* out) {
    tl_err[0] = '\0';
    if (r == NULL || out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_next: request or out is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* v = NULL;
    r1c_status st = call(F_NEXT, Py_BuildValue("(ON)", r->handle, timeout_arg(timeout_ms)), &v);
    if (st == R1C_OK && v == Py_None) {
        st = R1C_END;
    } else if (st == R1C_OK) {
        const char* text = NULL;
        Py_ssize_t text_len = 0;
        PyObject *top_ids = NULL, *top_lps = NULL, *finish = NULL;
        if (!PyArg_ParseTuple(v, "iiy#dOOO", &out->index, &out->token_id, &text, &text_len, &out->logprob, &top_ids,
                              &top_lps, &finish)) {
            python_error(tl_err, ERR_CAP, "r1c_next");
            st = R1C_ERR_INTERNAL;
        } else {
            Py_ssize_t n = PyList_Size(top_ids);
            if (!copy_text(&r->text, &r->text_cap, text, text_len) ||
                !grow((void**)&r->top_ids, &r->top_ids_cap, (size_t)n + 1, sizeof(int32_t)) ||
                !grow((void**)&r->top_lps, &r->top_lps_cap, (size_t)n + 1, sizeof(double))) {
                st = fail(R1C_ERR_INTERNAL, "r1c_next: out of memory");
            } else {
                for (Py_ssize_t i = 0; i < n; i++) {
                    r->top_ids[i] = (int32_t)PyLong_AsLong(PyList_GET_ITEM(top_ids, i));
                    r->top_lps[i] = PyFloat_AsDouble(PyList_GET_ITEM(top_lps, i));
                }
                out->text = r->text;
                out->text_len = (size_t)text_len;
                out->n_top = (int32_t)n;
                out->top_ids = r->top_ids;
                out->top_logprobs = r->top_lps;
                out->finish_reason = NULL;
                if (finish != Py_None) {
                    snprintf(r->finish, sizeof r->finish, "%s", PyBytes_AsString(finish));
                    out->finish_reason = r->finish;
                }
            }
        }
    }
    Py_XDECREF(v);
    PyGILState_Release(gil);
    return st;
}

r1c_status r1c_wait(r1c_request* r, int32_t timeout_ms, r1c_result* out) {
    tl_err[0] = '\0';
    if (r == NULL || out == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_wait: request or out is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* v = NULL;
    r1c_status st = call(F_WAIT, Py_BuildValue("(ON)", r->handle, timeout_arg(timeout_ms)), &v);
    if (st == R1C_OK) {
        PyObject* ids = NULL;
        const char *text = NULL, *finish = NULL;
        Py_ssize_t text_len = 0;
        if (!PyArg_ParseTuple(v, "iOy#y", &out->n_prompt_tokens, &ids, &text, &text_len, &finish)) {
            python_error(tl_err, ERR_CAP, "r1c_wait");
            st = R1C_ERR_INTERNAL;
        } else {
            Py_ssize_t n = PyList_Size(ids);
            if (!grow((void**)&r->ids, &r->ids_cap, (size_t)n + 1, sizeof(int32_t)) ||
                !copy_text(&r->all_text, &r->all_text_cap, text, text_len)) {
                st = fail(R1C_ERR_INTERNAL, "r1c_wait: out of memory");
            } else {
                for (Py_ssize_t i = 0; i < n; i++) r->ids[i] = (int32_t)PyLong_AsLong(PyList_GET_ITEM(ids, i));
                snprintf(r->result_finish, sizeof r->result_finish, "%s", finish);
                out->n_tokens = (int32_t)n;
                out->token_ids = r->ids;
                out->text = r->all_text;
                out->text_len = (size_t)text_len;
                out->finish_reason = r->result_finish;
            }
        }
    }
    Py_XDECREF(v);
    PyGILState_Release(gil);
    return st;
}

r1c_status r1c_cancel(r1c_request* r) {
    tl_err[0] = '\0';
    if (r == NULL) return fail(R1C_ERR_INVALID_ARGUMENT, "r1c_cancel: request is NULL");
    PyGILState_STATE gil = PyGILState_Ensure();
    r1c_status st = call(F_CANCEL, Py_BuildValue("(O)", r->handle), NULL);
    PyGILState_Release(gil);
    return st;
}

void r1c_request_free(r1c_request* r) {
    if (r == NULL) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    call(F_CANCEL, Py_BuildValue("(O)", r->handle), NULL);
    Py_DECREF(r->handle);
    PyGILState_Release(gil);
    free(r->text);
    free(r->top_ids);
    free(r->top_lps);
    free(r->ids);
    free(r->all_text);
    free(r);
}
