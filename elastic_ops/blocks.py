"""Names of the compute blocks the operators in prefix.py create: the contract with the schedules, which find
each kernel by these names (schedule_cpu.py)."""

# one per linear layer of a decoder layer; the prefix matmul adds "<name>_out" (bias, crop of padded tokens),
# scheduled with it
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LM_HEAD = "lm_head"
# a quantized matmul (prefix_matmul_q): per-group partial sums and input sums (one token), or a strip
# dequantized into a scratch tile (several tokens); a quantized embedding's gather
QPART, QXSUM, DEQUANT = "qpart", "qxsum", "dequant"
EMBED = "embed"
RMS_SUMSQ, RMS_NORM = "sumsq", "rms_norm"
ROPE = "rope"
ROPE_TABLE = "rope_table"  # cos and sin once per forward, for projections that rotate their own output
ROTATED = "_rotated"  # suffix of such a projection's last block, after "<name>_out"
SILU_MUL = "silu_mul"
NEG_GATE = "neg_gate"  # -gate, the input of silu_mul's exp (inlined into it)
LAST = "last"  # the last position of a prefill, the only one that goes through the LM head
# attention: q.k, the masked and shifted scores (inlined), their max and sum, exp, p.v, the normalised output
QK, SCORE, PEAK, SHIFTED, TOTAL, PV, ATTENTION = "qk", "score", "peak", "shifted", "total", "pv", "attention"
FAST_EXP = "T_fast_exp"  # the name topi.fast_exp gives its block
# a level's LoRA update on a projection: x @ A^T, then @ B^T, added to the projection's output
LORA_A, LORA_B, LORA_OUT = "lora_a", "lora_b", "lora_out"
ELEMENTWISE = (RMS_NORM, ROPE, SILU_MUL, LAST)


def of(owner: str, block: str) -> str:
    """The name of a matmul's helper block (QPART, QXSUM, DEQUANT, LORA_A, LORA_B), e.g. "up_proj_qpart": one
    kernel may hold two matmuls (gate and up, k and v: compile/export.py), and each schedule finds its own helpers."""
    return f"{owner}_{block}"
