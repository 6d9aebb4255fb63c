"""In-place KV cache append: rows [past, past+T) of a full (max_len, n_kv*hd) cache buffer."""

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
