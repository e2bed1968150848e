"""Static size of the hot loops of compiled kernels, from `cuobjdump -sass` (no GPU needed).

    python benchmarks/sass_loops.py OBJECT [NAME_SUBSTRING ...]

For every kernel whose mangled name contains one of the substrings (default: all), per
architecture: the K-step loop of a GEMM kernel (the smallest loop, a backward branch, holding a
barrier and the matrix instructions: HMMA, or FFMA for fp32; one pass = one K step of 32), else
every innermost loop with a global load; its static instruction count, the size of loops nested in
it (fp32: the k loop inside a K step runs 8 times) and the count of the opcodes that matter (HMMA, LDSM, LDGSTS, LDS, LDG, BAR,
integer division helpers I2F/MUFU.RCP/F2I, CALL). Used for the entries of benchmarks/NOTES.md.
"""
import collections
import re
import subprocess
import sys

INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")
TARGET = re.compile(r"BRA(?:\.\S+)?\s+(?:`\((\.L_x_\d+)\)|(0x[0-9a-f]+))")
KEYS = ["HMMA", "FFMA", "LDSM", "LDGSTS", "LDS", "STS", "LDG", "BAR", "I2F", "MUFU.RCP", "F2I",
        "CALL", "BRA"]


def functions(text):
    """{(arch, name): [(addr, opcode_text)], labels} from cuobjdump -sass output."""
    out, arch, name = {}, None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            name = m.group(1)
            out[(arch, name)] = ([], {})
            continue
        if name is None:
            continue
        insns, labels = out[(arch, name)]
        m = LABEL.match(line)
        if m:
            labels[m.group(1)] = None  # resolved to the next instruction's address
            continue
        m = INSN.search(line)
        if m:
            addr = int(m.group(1), 16)
            for k, v in labels.items():
                if v is None:
                    labels[k] = addr
            insns.append((addr, m.group(2)))
    return out


def opcode(text):
    t = re.sub(r"^@!?U?P[T\d]\s+", "", text)
    return t.split()[0] if t else ""


def short(name):
    """rows_gemm_kernel<bf16,1,0> from the mangled name."""
    m = re.search(r"\d\d?([a-z_]+_kernel)I(.*?)EEv", name)
    if not m:
        return name[:80]
    args = re.sub(r"^f", "fp32,", m.group(2))
    args = args.replace("N3c108BFloat16E", "bf16,").replace("N3c104HalfE", "fp16,")
    args = re.sub(r"Lb(\d)E?", r"\1,", args).rstrip(",")
    return f"{m.group(1)}<{args}>"


def loops_of(insns, labels):
    """(start, end) of every backward branch."""
    loops = []
    for addr, text in insns:
        if opcode(text).startswith("BRA"):
            m = TARGET.search(text)
            target = None if m is None else (labels.get(m.group(1)) if m.group(1)
                                             else int(m.group(2), 16))
            if target is not None and target <= addr:
                loops.append((target, addr))
    return loops


def hot_loops(insns, labels):
    """The K-step loop (the smallest loop with a barrier and matrix instructions, HMMA or FFMA) if
    there is one, else every innermost loop with a global load."""
    loops = loops_of(insns, labels)

    def has(loop, *keys):
        return any(loop[0] <= a <= loop[1] and opcode(t).startswith(keys) for a, t in insns)

    kstep = [l for l in loops if has(l, "BAR") and has(l, "HMMA", "FFMA")]
    if kstep:
        return [min(kstep, key=lambda l: l[1] - l[0])]
    inner = [l for l in loops if not any(o != l and l[0] <= o[0] and o[1] <= l[1] for o in loops)]
    return [l for l in inner if has(l, "LDG")]


def main():
    obj, subs = sys.argv[1], sys.argv[2:]
    text = subprocess.run(["cuobjdump", "-sass", obj], check=True, capture_output=True,
                          text=True).stdout
    for (arch, name), (insns, labels) in sorted(functions(text).items()):
        if subs and not any(s in name for s in subs):
            continue
        for loop in hot_loops(insns, labels):
            body = [t for a, t in insns if loop[0] <= a <= loop[1]]
            ops = collections.Counter(opcode(t) for t in body)
            counts = {k: sum(v for o, v in ops.items() if o == k or o.startswith(k + "."))
                      for k in KEYS}
            counts["MUFU.RCP"] = ops.get("MUFU.RCP", 0)
            inner = [l for l in loops_of(insns, labels)
                     if l != loop and loop[0] <= l[0] and l[1] <= loop[1]]
            nested = "".join(f"; inner loop {(e - s) // 16 + 1} insns" for s, e in inner)
            shown = " ".join(f"{k}={v}" for k, v in counts.items() if v)
            print(f"{arch} {short(name)}: {len(body)} insns{nested}; {shown}")


if __name__ == "__main__":
    main()
