"""Triton kernels of the fused R-Drop loss: only ``@triton.jit`` code lives here.

Math, per row (README, "The math"). ``z1, z2`` are one row of each pass, after the optional softcap
``z = c * tanh(x / c)``; ``e_y`` is the one-hot of the label ``y``; ``eps`` the label smoothing.
Each pass's log-sum-exp is kept as two numbers, its maximum ``m_k`` and ``log s_k`` with
``s_k = sum exp(z_k - m_k)``, so that ``p = exp((z1 - m1) - log s1)`` loses nothing to the rounding
of a large ``lse = m + log s`` (which has an absolute error of |lse| * 2^-24):

    p = exp(z1 - m1 - log s1)        q = exp(z2 - m2 - log s2)        D = z1 - z2
    CE_k  = (m_k - z_k[y]) + log s_k + eps (z_k[y] - m_k - sigma_k / V'),  sigma_k = sum (z_k - m_k)
    symKL = 1/2 sum (p - q) D = 1/2 (E_p[D] - E_q[D])                  (because sum p - q = 0)

    dz1 = c_ce1 (p - (1 - eps) e_y - eps / V') + c_kl / 2 (p (D - E_p[D]) + p - q)
    dz2 = c_ce2 (q - (1 - eps) e_y - eps / V') - c_kl / 2 (q (D - E_q[D]) + p - q)

``c_ce1, c_ce2, c_kl`` are the row's upstream gradients of ``CE_1, CE_2, symKL``. With softcap the
gradient is multiplied by ``1 - (z / c)^2``. A position where both raw logits are -inf (a masked
vocabulary entry) is absent from the row: it adds nothing to any sum, gets gradient 0, and ``V'``
counts the present positions only; a row with no present position has symKL = 0 (the empty sum).
All math is fp32 whatever the input dtype.

Rows whose loss is not finite: NaN or +inf in a row makes its loss NaN, a -inf in one pass only
makes it +inf, as does a label on an absent entry. Such a row's gradients are NaN, whole rows. A
label outside [0, V) that is not ignore_index makes its row's parts and gradients NaN; it is never
read.

With the vocabulary split across ranks, ``_rdrop_partials_kernel`` stops before the finishing
steps: it writes each row's partial sums of its slice (``partials``, [10, n_rows]), which
``fastrdrop.distributed`` reduces across the ranks and finishes into the same parts and stats.

Per-row statistics kept for the backward pass (``stats``, shape [8, n_rows]):
``m1, m2, log s1, log s2, E_p[D], E_q[D], V', row_ok`` (row_ok: 1, or 0 where the loss is not
finite). Per-row loss parts (``parts``, shape [3, n_rows]): ``CE_1, CE_2, symKL``, all 0 for an
ignored row.

Specialisation. Triton compiles one binary per value of the constexpr flags (UPPER_CASE) and per
property of the arguments it specialises on. Here no argument is specialised: sizes, strides,
flags given as values, ignore_index and the pointers are all plain values (otherwise V = 1, one
row, a stride divisible by 16, a pointer's alignment or, on AMD, a tensor under 2 GiB would each
be another binary). What the compiler needs for 128-bit loads and stores the launcher says with
``ALIGNED``: every row of the logits and gradients starts on a 16-byte boundary and V fills whole
16-byte vectors. The kernels then tell the compiler (``_row``, ``_row_length``). The binaries a
call can launch are therefore exactly dtype x ALIGNED x the launch table of ops.py x SOFTCAP per
kernel, and tests/test_codegen.py compiles every one of them for each GPU target.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

NEG_INF = tl.constexpr(float("-inf"))
FLOAT_MAX = tl.constexpr(3.4028234663852886e38)
LOG2E = tl.constexpr(1.4426950408889634)
# tanh(y) / y = 1 + c1 u + c2 u^2 + c3 u^3 + c4 u^4, u = y^2, |y| < 1/2: a fit for relative error
TANH_C1 = tl.constexpr(-0.3333306908607483)
TANH_C2 = tl.constexpr(0.13324779272079468)
TANH_C3 = tl.constexpr(-0.05298607423901558)
TANH_C4 = tl.constexpr(0.017135005444288254)


def _jit(fn):
    """@triton.jit, specialising on the constexpr flags only (see the module docstring)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    values = [name for name in names if fn.__annotations__.get(name) is not tl.constexpr]
    return triton.jit(fn, do_not_specialize=values)


@triton.jit
def _row(ptr, row, stride, ALIGNED: tl.constexpr):
    """ptr + row * stride (row is int64). When ALIGNED the launcher checked that the row starts on
    a 16-byte boundary, and the compiler is told so (the interpreter has no use for the hint)."""
    row_ptr = ptr + row * stride
    if ALIGNED and not INTERPRETED:
        row_ptr = tl.multiple_of(row_ptr, 16)
    return row_ptr


@triton.jit
def _row_length(V, ptr, ALIGNED: tl.constexpr):
    """V. When ALIGNED the launcher checked that it is a multiple of the 16-byte vector length of
    ptr's dtype; written so that the compiler sees it, the masks of whole vectors are uniform."""
    if ALIGNED and not INTERPRETED:
        vec: tl.constexpr = 128 // ptr.dtype.element_ty.primitive_bitwidth
        V = V // vec * vec
    return V


@triton.jit
def _exp2(x):
    """2^x; on NVIDIA one ex2.approx.ftz: libdevice's exp2f, with Triton's default of flushing
    subnormals to zero in libdevice. tl.exp's ex2.approx without ftz is three more instructions
    per entry, which make subnormal results (p < 2^-126, which add nothing to a sum that holds
    exp(0) = 1); the native kernel flushes them too."""
    if INTERPRETED:
        return tl.exp2(x)
    return libdevice.exp2(x)


@triton.jit
def _exp(x):
    return _exp2(x * LOG2E)


@triton.jit
def _softcap(x, softcap):
    """c * tanh(x / c), with tanh written through exp so that it also runs under the interpreter:
    (1 - e) / (1 + e), e = exp(-2 |x / c|), from |x / c| = 1/2 on. Below, where 1 - e would cancel
    (an error of about c 2^-25 in the result, growing with the softcap), y P(y^2) within 1.1e-7
    of tanh(y) (the native kernel's softcap_of)."""
    y = x / softcap
    u = y * y
    small = y * (1.0 + u * (TANH_C1 + u * (TANH_C2 + u * (TANH_C3 + u * TANH_C4))))
    e = _exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(tl.abs(y) < 0.5, small, tl.where(x < 0, -t, t))


@triton.jit
def _load_block(z1_row_ptr, z2_row_ptr, offs, V, softcap, SOFTCAP: tl.constexpr):
    """One vocabulary block of both rows as fp32, softcapped, with its mask of present positions."""
    in_row = offs < V
    z1 = tl.load(z1_row_ptr + offs, mask=in_row, other=NEG_INF).to(tl.float32)
    z2 = tl.load(z2_row_ptr + offs, mask=in_row, other=NEG_INF).to(tl.float32)
    present = (z1 != NEG_INF) | (z2 != NEG_INF)  # lanes past V load -inf twice: absent too
    if SOFTCAP:
        z1 = tl.where(present, _softcap(z1, softcap), NEG_INF)
        z2 = tl.where(present, _softcap(z2, softcap), NEG_INF)
    return z1, z2, present


@triton.jit
def _store_grad(ptr, x, mask):
    # fp32 -> the logits' dtype, rounding to nearest even, as the GPU's conversion does. Triton's
    # interpreter truncates to bf16, so there the rounding is done on the bits: add half an ulp,
    # ties to even, then cut.
    if INTERPRETED and ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    tl.store(ptr, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fill_rows(dz1_row_ptr, dz2_row_ptr, V, value, BLOCK: tl.constexpr):
    """Both gradient rows set to ``value``: 0 for an ignored row, NaN where the loss is not
    finite."""
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        fill = tl.full([BLOCK], value, dtype=tl.float32)
        tl.store(dz1_row_ptr + offs, fill.to(dz1_row_ptr.dtype.element_ty), mask=offs < V)
        tl.store(dz2_row_ptr + offs, fill.to(dz2_row_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _shift(m):
    """A running max as the shift of exp(z - shift): 0 while nothing present has been seen, so
    that -inf - -inf never happens."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _row_sums(z1_row_ptr, z2_row_ptr, V, eps, softcap, SOFTCAP: tl.constexpr,
              ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One streaming pass over a row: its partial statistics
    (m1, m2, s1, s2, t1, t2, sigma1, sigma2, V', lone)."""
    # A block is [VEC, LANES]: LANES lanes, one per thread, of VEC entries each (16 bytes of
    # logits). Each lane keeps the statistics of its own entries across the loop: the online max
    # m_k, and relative to it s_k = sum exp(z_k - m_k), t_k = sum exp(z_k - m_k) D; with smoothing
    # sigma_k = sum (z_k - m_k) and V' (else 0); lone: 1 if a position is -inf in one pass only
    # (its KL is +inf, whatever exp(z) rounds to), or +inf against another value (a NaN row;
    # the loop keeps the maximum of |D / 2|). In a row with a lone -inf, t_k may be inf or NaN:
    # _row_stats and fastrdrop.distributed set that row's KL from lone and s_k alone.
    # The loop reduces within a thread only (axis 0), and the lanes are combined once, after it:
    # a reduction across threads in the loop costs a barrier per statistic per block. Every
    # instruction counts: on an H200 the 16-bit loop read at half a copy's bandwidth where the
    # fp32 one, with half the entries per byte, read at a copy's. So -inf takes no mask and no
    # comparison here, only the maximum and minimum below.
    VEC: tl.constexpr = 128 // z1_row_ptr.dtype.element_ty.primitive_bitwidth
    LANES: tl.constexpr = BLOCK // VEC
    if ALIGNED:  # a lane is one 16-byte vector
        lane_offs = tl.arange(0, VEC)[:, None] + tl.arange(0, LANES)[None, :] * VEC
    else:  # a lane is every LANES-th entry: each load is coalesced across the threads
        lane_offs = tl.arange(0, VEC)[:, None] * LANES + tl.arange(0, LANES)[None, :]
    m1 = tl.full([LANES], NEG_INF, tl.float32)
    m2 = tl.full([LANES], NEG_INF, tl.float32)
    s1 = tl.zeros([LANES], tl.float32)
    s2 = tl.zeros([LANES], tl.float32)
    t1 = tl.zeros([LANES], tl.float32)
    t2 = tl.zeros([LANES], tl.float32)
    sigma1 = tl.zeros([LANES], tl.float32)
    sigma2 = tl.zeros([LANES], tl.float32)
    n_present = tl.zeros([LANES], tl.float32)
    lone = tl.zeros([LANES], tl.float32)
    for start in range(0, V, BLOCK):
        z1, z2, present = _load_block(z1_row_ptr, z2_row_ptr, start + lane_offs, V, softcap,
                                      SOFTCAP)
        # h = D / 2 (t_k sums exp(z_k - m_k) h here, twice that is returned): half the rounded
        # D exactly, and finite for finite logits (D overflows past 1.7e38). |h| = inf where one
        # logit is infinite and the other is not that infinity: a lone -inf, or +inf (whose row
        # is NaN anyway). Where both are -inf (absent) h is NaN, which maximum and minimum skip
        # (maxnum and minnum give the other operand; so do numpy's fmax and fmin, which Triton's
        # interpreter takes from 3.8 on).
        h = 0.5 * z1 - 0.5 * z2
        lone = tl.maximum(lone, tl.max(tl.abs(h), 0))
        # NaN and +inf -> the largest float, so that h times exp(z) = 0 is 0. -inf is left only
        # in a row with a lone -inf, whose KL is +inf whatever t_k holds.
        h = tl.minimum(h, FLOAT_MAX)
        m1_new = tl.maximum(m1, tl.max(z1, 0))
        m2_new = tl.maximum(m2, tl.max(z2, 0))
        shift1 = _shift(m1_new)
        shift2 = _shift(m2_new)
        x1 = z1 - shift1[None, :]
        x2 = z2 - shift2[None, :]
        # label smoothing (0 without target): a uniform branch, before the exponentials (after
        # them it kept x_k and the masks live across them: 14 more registers, spills on sm_100)
        if eps > 0:
            # sum (z - shift) is exact enough where sum z is not (|z| ~ 1e4 over 1e5 entries)
            sigma1 += tl.sum(tl.where(present, x1, 0.0), 0) - n_present * (shift1 - _shift(m1))
            sigma2 += tl.sum(tl.where(present, x2, 0.0), 0) - n_present * (shift2 - _shift(m2))
            n_present += tl.sum(present.to(tl.float32), 0)
        e1 = _exp(x1)
        e2 = _exp(x2)
        rescale1 = _exp(m1 - shift1)
        rescale2 = _exp(m2 - shift2)
        s1 = s1 * rescale1 + tl.sum(e1, 0)
        s2 = s2 * rescale2 + tl.sum(e2, 0)
        t1 = t1 * rescale1 + tl.sum(e1 * h, 0)
        t2 = t2 * rescale2 + tl.sum(e2 * h, 0)
        m1 = m1_new
        m2 = m2_new
    # the lanes, each moved to the row's max
    row_m1 = tl.max(m1, 0)
    row_m2 = tl.max(m2, 0)
    shift1 = _shift(row_m1)
    shift2 = _shift(row_m2)
    rescale1 = _exp(m1 - shift1)
    rescale2 = _exp(m2 - shift2)
    sigma1 = tl.sum(sigma1 + n_present * (_shift(m1) - shift1), 0)
    sigma2 = tl.sum(sigma2 + n_present * (_shift(m2) - shift2), 0)
    return (row_m1, row_m2, tl.sum(s1 * rescale1, 0), tl.sum(s2 * rescale2, 0),
            2.0 * tl.sum(t1 * rescale1, 0), 2.0 * tl.sum(t2 * rescale2, 0), sigma1, sigma2,
            tl.sum(n_present, 0), (tl.max(lone, 0) == float("inf")).to(tl.float32))


@triton.jit
def _row_stats(z1_row_ptr, z2_row_ptr, y, has_target, V, eps, softcap,
               SOFTCAP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One streaming pass over a row: (CE_1, CE_2, symKL) and the stats
    (m1, m2, log s1, log s2, E_p[D], E_q[D], V', row_ok)."""
    # 1. the partial statistics of the whole row
    m1, m2, s1, s2, t1, t2, sigma1, sigma2, n_present, lone = _row_sums(
        z1_row_ptr, z2_row_ptr, V, eps, softcap, SOFTCAP, ALIGNED, BLOCK)

    # 2. log s_k, E_p[D] = t1 / s1, E_q[D] = t2 / s2, symKL = (E_p[D] - E_q[D]) / 2, and 0 for a
    #    row with nothing present (both s_k are 0 only then)
    log_s1 = tl.log(s1)
    log_s2 = tl.log(s2)
    ep = t1 / s1
    eq = t2 / s2
    kl = tl.where((s1 == 0) & (s2 == 0), 0.0, 0.5 * (ep - eq))
    # -inf in one pass only: +inf, unless the row is NaN (NaN sums) or a pass has no finite entry
    kl = tl.where((lone > 0) & (s1 > 0) & (s2 > 0), float("inf"), kl)

    # 3. CE_k = (m_k - z_k[y]) + log s_k + eps (z_k[y] - m_k - sigma_k / V'); every part NaN for a
    #    label outside [0, V), which is not read
    ce1 = 0.0
    ce2 = 0.0
    if has_target:
        label_ok = (y >= 0) & (y < V)
        y_safe = tl.where(label_ok, y, 0)
        zy1 = tl.load(z1_row_ptr + y_safe).to(tl.float32)
        zy2 = tl.load(z2_row_ptr + y_safe).to(tl.float32)
        if SOFTCAP:  # a label on an absent entry stays -inf: its cross entropy is inf
            label_absent = (zy1 == NEG_INF) & (zy2 == NEG_INF)
            zy1 = tl.where(label_absent, NEG_INF, _softcap(zy1, softcap))
            zy2 = tl.where(label_absent, NEG_INF, _softcap(zy2, softcap))
        # a_k = z_k[y] - m_k: exact where it matters; -inf for a label of probability 0
        a1 = tl.where(zy1 == NEG_INF, NEG_INF, zy1 - m1)
        a2 = tl.where(zy2 == NEG_INF, NEG_INF, zy2 - m2)
        # (log s - a) + eps (a - sigma / V'): exactly 0 where it is 0 (V' = 1); a label of
        # probability 0 has an infinite cross entropy (also in a row with nothing present)
        ce1 = tl.where(a1 == NEG_INF, float("inf"), log_s1 - a1)
        ce2 = tl.where(a2 == NEG_INF, float("inf"), log_s2 - a2)
        if eps > 0:
            ce1 += eps * tl.where(a1 == NEG_INF, 0.0, a1 - sigma1 / n_present)
            ce2 += eps * tl.where(a2 == NEG_INF, 0.0, a2 - sigma2 / n_present)
        ce1 = tl.where(label_ok, ce1, float("nan"))
        ce2 = tl.where(label_ok, ce2, float("nan"))
        kl = tl.where(label_ok, kl, float("nan"))
    # 4. a row whose loss is not finite gets NaN gradients: |x| < inf is false for NaN too
    row_ok = (tl.abs(ce1 + ce2 + kl) < float("inf")).to(tl.float32)
    return ce1, ce2, kl, m1, m2, log_s1, log_s2, ep, eq, n_present, row_ok


@triton.jit
def _pair_grads(z1, z2, m1, m2, log2_s1, log2_s2, ep, eq, c_ce1, c_ce2, c_kl, target, softcap,
                SOFTCAP: tl.constexpr):
    """dz1, dz2 at entries z1, z2 whose CE target ((1 - eps) e_y + eps / V') is ``target``;
    ep, eq are E_p[h], E_q[h] of h = D / 4, and log2_s = log s * log2 e."""
    # p = exp(z1 - m1 - log s1) = 2^((z1 - m1) log2 e - log2 s1): one FMA for the exponent
    p = _exp2((z1 - m1) * LOG2E - log2_s1)
    q = _exp2((z2 - m2) * LOG2E - log2_s2)
    # dz1 = c_kl (p (D - E_p[D]) + p - q) / 2 + c_ce1 (p - target),
    # dz2 = -c_kl (q (D - E_q[D]) + p - q) / 2 + c_ce2 (q - target). With h = D / 4, h - E_p[h]
    # is finite for finite logits (D, and D - E_p[D], overflow past 1.7e38): p (h - E_p[h]) is 0
    # where p is 0. In FMAs: c_ce p + (2 c_kl p (h - E_p[h]) + (c_kl / 2 (p - q) - c_ce target))
    h = 0.25 * z1 - 0.25 * z2
    half_kl = 0.5 * c_kl
    p_q = p - q
    dz1 = c_ce1 * p + (2.0 * c_kl * (p * (h - ep)) + (half_kl * p_q - c_ce1 * target))
    dz2 = c_ce2 * q + (-2.0 * c_kl * (q * (h - eq)) - (half_kl * p_q + c_ce2 * target))
    if SOFTCAP:
        # d/dx c tanh(x / c) = 1 - (z / c)^2
        dz1 *= 1.0 - (z1 / softcap) * (z1 / softcap)
        dz2 *= 1.0 - (z2 / softcap) * (z2 / softcap)
    return dz1, dz2


@triton.jit
def _row_grads(z1_row_ptr, z2_row_ptr, dz1_row_ptr, dz2_row_ptr, y, has_target, V,
               m1, m2, log_s1, log_s2, ep, eq, n_present, row_ok, c_ce1, c_ce2, c_kl, eps,
               softcap, SOFTCAP: tl.constexpr, BLOCK: tl.constexpr):
    """Second pass over a row: dz1, dz2 (which may alias z1, z2) from the stats; NaN rows where
    the loss is not finite. The loop writes every entry as if it were not the label's; the
    label's entry is written again after it. Without target the CE part vanishes (c_ce = 0): no
    branch, no other binary."""
    # NaN where the loss is not finite, in every coefficient and for every absent entry: whole
    # rows of NaN (values, not a branch, which would take registers of its own)
    poison = tl.where(row_ok != 0, 0.0, float("nan"))
    c_ce1 = tl.where(has_target, c_ce1, 0.0) + poison
    c_ce2 = tl.where(has_target, c_ce2, 0.0) + poison
    c_kl = c_kl + poison
    smoothing = tl.where(eps > 0, eps / n_present, 0.0)
    log2_s1 = log_s1 * LOG2E
    log2_s2 = log_s2 * LOG2E
    ep = 0.25 * ep  # E_p[D] -> E_p[h]
    eq = 0.25 * eq
    # the label's entries, read before the loop may overwrite them (in place); a label outside
    # [0, V) has no term here (with a vocabulary split across ranks it is another rank's)
    on_row = has_target & (y >= 0) & (y < V)
    y = tl.where(on_row, y, 0)
    zy1, zy2, y_present = _load_block(z1_row_ptr, z2_row_ptr, y, V, softcap, SOFTCAP)
    # every thread's reads of the label's entries (here and in _row_stats) before any thread's
    # stores: in place, another warp may write the label's block while this one has yet to read
    tl.debug_barrier()
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        z1, z2, present = _load_block(z1_row_ptr, z2_row_ptr, offs, V, softcap, SOFTCAP)
        dz1, dz2 = _pair_grads(z1, z2, m1, m2, log2_s1, log2_s2, ep, eq, c_ce1, c_ce2, c_kl,
                               smoothing, softcap, SOFTCAP)
        _store_grad(dz1_row_ptr + offs, tl.where(present, dz1, poison), offs < V)
        _store_grad(dz2_row_ptr + offs, tl.where(present, dz2, poison), offs < V)
    if on_row:
        dz1, dz2 = _pair_grads(zy1, zy2, m1, m2, log2_s1, log2_s2, ep, eq, c_ce1, c_ce2, c_kl,
                               1.0 - eps + smoothing, softcap, SOFTCAP)
        # after every thread's stores of the loop: a barrier orders the program's global memory
        # too (bar.sync on NVIDIA; workgroup fences around s_barrier on AMD)
        tl.debug_barrier()
        _store_grad(dz1_row_ptr + y, tl.where(y_present, dz1, poison), True)
        _store_grad(dz2_row_ptr + y, tl.where(y_present, dz2, poison), True)


@_jit
def _rdrop_fwd_kernel(
    z1_ptr, z2_ptr, target_ptr, row_weight_ptr,       # inputs
    parts_ptr, stats_ptr,                              # outputs: [3, n_rows], [8, n_rows] fp32
    dz1_ptr, dz2_ptr,                                  # outputs [n_rows, V] when write_grads
    n_rows, V,                                         # shapes
    z1_row_stride, z2_row_stride,                      # strides (the last dim is contiguous)
    dz1_row_stride, dz2_row_stride,
    has_target, ignore_index, eps, softcap, alpha,     # loss parameters (target_ptr: int64)
    write_grads,                                       # 1: also write the gradients (see below)
    SOFTCAP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row. write_grads: also write into dz1, dz2 (which may be z1, z2: in
    place) the gradients of row_weight * (CE_1 + CE_2 + alpha * symKL), in a second pass over
    the row, while the row is likely still in L2. A value, not a specialisation: both modes
    share one binary, whose registers are those of the gradient pass (the passes are
    sequential)."""
    # int64: row * stride and k * n_rows + row overflow int32 past 2^31 elements
    row = tl.program_id(0).to(tl.int64)
    n_rows = n_rows.to(tl.int64)
    V = _row_length(V, z1_ptr, ALIGNED)
    z1_row_ptr = _row(z1_ptr, row, z1_row_stride, ALIGNED)
    z2_row_ptr = _row(z2_ptr, row, z2_row_stride, ALIGNED)
    dz1_row_ptr = _row(dz1_ptr, row, dz1_row_stride, ALIGNED)
    dz2_row_ptr = _row(dz2_ptr, row, dz2_row_stride, ALIGNED)

    has_target = has_target != 0
    y = tl.load(target_ptr + row, mask=has_target, other=-1).to(tl.int64)
    if has_target & (y == ignore_index):  # never read: parts, stats and gradients 0
        for k in range(3):
            tl.store(parts_ptr + k * n_rows + row, 0.0)
        for k in range(8):
            tl.store(stats_ptr + k * n_rows + row, 0.0)
        if write_grads != 0:
            _fill_rows(dz1_row_ptr, dz2_row_ptr, V, 0.0, BLOCK)
        return

    ce1, ce2, kl, m1, m2, log_s1, log_s2, ep, eq, n_present, row_ok = _row_stats(
        z1_row_ptr, z2_row_ptr, y, has_target, V, eps, softcap, SOFTCAP, ALIGNED, BLOCK)
    tl.store(parts_ptr + row, ce1)
    tl.store(parts_ptr + n_rows + row, ce2)
    tl.store(parts_ptr + 2 * n_rows + row, kl)
    tl.store(stats_ptr + row, m1)
    tl.store(stats_ptr + n_rows + row, m2)
    tl.store(stats_ptr + 2 * n_rows + row, log_s1)
    tl.store(stats_ptr + 3 * n_rows + row, log_s2)
    tl.store(stats_ptr + 4 * n_rows + row, ep)
    tl.store(stats_ptr + 5 * n_rows + row, eq)
    tl.store(stats_ptr + 6 * n_rows + row, n_present)
    tl.store(stats_ptr + 7 * n_rows + row, row_ok)

    if write_grads != 0:
        w = tl.load(row_weight_ptr + row)  # c_ce1 = c_ce2 = w (unused without target), c_kl = a w
        _row_grads(z1_row_ptr, z2_row_ptr, dz1_row_ptr, dz2_row_ptr, y, has_target, V,
                   m1, m2, log_s1, log_s2, ep, eq, n_present, row_ok, w, w, alpha * w, eps,
                   softcap, SOFTCAP, BLOCK)


@_jit
def _rdrop_bwd_kernel(
    z1_ptr, z2_ptr, target_ptr, stats_ptr, grad_parts_ptr,   # inputs
    upstream_ptr,                                            # fp32, a row's upstream gradient
    dz1_ptr, dz2_ptr,                                        # outputs [n_rows, V]
    n_rows, V,                                               # shapes
    z1_row_stride, z2_row_stride,                            # strides (the last dim is contiguous)
    dz1_row_stride, dz2_row_stride, upstream_stride,         # (upstream: 0 for one value)
    has_target, has_upstream, ignore_index, eps, softcap,    # loss parameters (target: int64)
    SOFTCAP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: dz1, dz2 (which may be z1, z2) from the saved stats and the parts'
    upstream gradients. A label outside [0, V) has no term here: with a vocabulary split across
    ranks it is another rank's. With has_upstream, a row whose upstream gradient is 1 is left as
    it is: the forward pass wrote its gradients."""
    row = tl.program_id(0).to(tl.int64)
    has_upstream = has_upstream != 0
    upstream = tl.load(upstream_ptr + row * upstream_stride, mask=has_upstream, other=0.0)
    if has_upstream & (upstream == 1.0):
        return
    n_rows = n_rows.to(tl.int64)
    V = _row_length(V, z1_ptr, ALIGNED)
    z1_row_ptr = _row(z1_ptr, row, z1_row_stride, ALIGNED)
    z2_row_ptr = _row(z2_ptr, row, z2_row_stride, ALIGNED)
    dz1_row_ptr = _row(dz1_ptr, row, dz1_row_stride, ALIGNED)
    dz2_row_ptr = _row(dz2_ptr, row, dz2_row_stride, ALIGNED)

    has_target = has_target != 0
    y = tl.load(target_ptr + row, mask=has_target, other=-1).to(tl.int64)
    if has_target & (y == ignore_index):
        _fill_rows(dz1_row_ptr, dz2_row_ptr, V, 0.0, BLOCK)
        return

    m1 = tl.load(stats_ptr + row)
    m2 = tl.load(stats_ptr + n_rows + row)
    log_s1 = tl.load(stats_ptr + 2 * n_rows + row)
    log_s2 = tl.load(stats_ptr + 3 * n_rows + row)
    ep = tl.load(stats_ptr + 4 * n_rows + row)
    eq = tl.load(stats_ptr + 5 * n_rows + row)
    n_present = tl.load(stats_ptr + 6 * n_rows + row)
    row_ok = tl.load(stats_ptr + 7 * n_rows + row)
    c_ce1 = tl.load(grad_parts_ptr + row)
    c_ce2 = tl.load(grad_parts_ptr + n_rows + row)
    c_kl = tl.load(grad_parts_ptr + 2 * n_rows + row)
    _row_grads(z1_row_ptr, z2_row_ptr, dz1_row_ptr, dz2_row_ptr, y, has_target, V,
               m1, m2, log_s1, log_s2, ep, eq, n_present, row_ok, c_ce1, c_ce2, c_kl, eps,
               softcap, SOFTCAP, BLOCK)


@_jit
def _rdrop_partials_kernel(
    z1_ptr, z2_ptr,                                    # inputs [n_rows, V]
    partials_ptr,                                      # output [10, n_rows] fp32
    n_rows, V,                                         # shapes
    z1_row_stride, z2_row_stride,                      # strides (the last dim is contiguous)
    eps, softcap,                                      # eps > 0: also sigma_k and V'
    SOFTCAP: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: the partial statistics (m1, m2, s1, s2, t1, t2, sigma1, sigma2, V',
    lone) of a slice of the vocabulary, for fastrdrop.distributed to reduce across ranks."""
    row = tl.program_id(0).to(tl.int64)
    n_rows = n_rows.to(tl.int64)
    V = _row_length(V, z1_ptr, ALIGNED)
    z1_row_ptr = _row(z1_ptr, row, z1_row_stride, ALIGNED)
    z2_row_ptr = _row(z2_ptr, row, z2_row_stride, ALIGNED)
    m1, m2, s1, s2, t1, t2, sigma1, sigma2, n_present, lone = _row_sums(
        z1_row_ptr, z2_row_ptr, V, eps, softcap, SOFTCAP, ALIGNED, BLOCK)
    tl.store(partials_ptr + row, m1)
    tl.store(partials_ptr + n_rows + row, m2)
    tl.store(partials_ptr + 2 * n_rows + row, s1)
    tl.store(partials_ptr + 3 * n_rows + row, s2)
    tl.store(partials_ptr + 4 * n_rows + row, t1)
    tl.store(partials_ptr + 5 * n_rows + row, t2)
    tl.store(partials_ptr + 6 * n_rows + row, sigma1)
    tl.store(partials_ptr + 7 * n_rows + row, sigma2)
    tl.store(partials_ptr + 8 * n_rows + row, n_present)
    tl.store(partials_ptr + 9 * n_rows + row, lone)


@_jit
def _scale_rows_kernel(
    z1_ptr, z2_ptr, scale_ptr,               # z1, z2 [n_rows, V] scaled in place; scale [n_rows]
    V, z1_row_stride, z2_row_stride,         # shape, strides (the last dim is contiguous)
    scale_stride,                            # 0: one scale for every row
    ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row: z_k[row] *= scale[row]. A row whose scale is 1 (the upstream gradient
    of a loss that is not scaled afterwards) is left alone: no memory is touched."""
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    if scale == 1.0:
        return
    V = _row_length(V, z1_ptr, ALIGNED)
    z1_row_ptr = _row(z1_ptr, row, z1_row_stride, ALIGNED)
    z2_row_ptr = _row(z2_ptr, row, z2_row_stride, ALIGNED)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < V
        z1 = tl.load(z1_row_ptr + offs, mask=in_row).to(tl.float32)
        z2 = tl.load(z2_row_ptr + offs, mask=in_row).to(tl.float32)
        _store_grad(z1_row_ptr + offs, z1 * scale, in_row)
        _store_grad(z2_row_ptr + offs, z2 * scale, in_row)


# Whether these kernels run under Triton's interpreter (TRITON_INTERPRET=1 before import).
INTERPRETED = tl.constexpr(not isinstance(_rdrop_fwd_kernel, triton.runtime.JITFunction))
