"""In-place KV cache appends: V as rows [past, past+T) of (max_len, n_kv*hd); K transposed, as columns
[past, past+T) of (n_kv*hd, max_len), which is the layout the attention kernel's q.k reads contiguously."""

from tvm.script import tirx as T


@T.prim_func(private=True, s_tir=True)
def kv_append(var_cache: T.handle, var_new: T.handle, past: T.int64):
    max_len, width, n = T.int64(), T.int64(), T.int64()
    cache = T.match_buffer(var_cache, (max_len, width), "float32")
    new = T.match_buffer(var_new, (n, width), "float32")
    for t, c in T.grid(n, width):
        with T.sblock("append"):
            vt, vc = T.axis.remap("SS", [t, c])
            cache[past + vt, vc] = new[vt, vc]


@T.prim_func(private=True, s_tir=True)
def kv_append_transposed(var_cache: T.handle, var_new: T.handle, past: T.int64):
    max_len, width, n = T.int64(), T.int64(), T.int64()
    cache = T.match_buffer(var_cache, (width, max_len), "float32")
    new = T.match_buffer(var_new, (n, width), "float32")
    for c, t in T.grid(width, n):
        with T.sblock("append_t"):
            vc, vt = T.axis.remap("SS", [c, t])
            cache[vc, past + vt] = new[vt, vc]
