"""Each loss against values computed by hand from its formula."""

import dataclasses
import math

import pytest
import torch

from rayalign import losses
from rayalign.config import LossConfig
from rayalign.train.meter import IntervalMeter, preference_stats


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def logsig(x):
    return -math.log1p(math.exp(-x))


# policy chosen/rejected, reference chosen/rejected for two pairs:
# pair 0: h = (-1 - -3) - (-2 - -2) = 2, δ_θ = 2, δ_ref = 0
# pair 1: h = (-5 - -4) - (-6 - -2) = 3, δ_θ = -1, δ_ref = -4  (in U: δ_ref < δ_θ < 0)
PC, PR, RC, RR = t(-1.0, -5.0), t(-3.0, -4.0), t(-2.0, -6.0), t(-2.0, -2.0)
H = [2.0, 3.0]
DELTA_REF = [0.0, -4.0]
DELTA_POLICY = [2.0, -1.0]


def test_margins():
    h, dp, dr = losses.margins(PC, PR, RC, RR)
    assert h.tolist() == H and dp.tolist() == DELTA_POLICY and dr.tolist() == DELTA_REF


@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.5, 0.2)])
def test_dpo(beta, eps):
    got = losses.dpo(PC, PR, RC, RR, beta=beta, label_smoothing=eps)
    want = [-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h) for h in H]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_dpo_at_zero_margin_is_log2():
    zero = t(-1.0)
    assert losses.dpo(zero, zero, zero, zero, beta=0.1).item() == pytest.approx(math.log(2))


def test_ipo():
    beta = 0.25  # 1/(2β) = 2
    assert losses.ipo(PC, PR, RC, RR, beta=beta).tolist() == pytest.approx([(2 - 2) ** 2, (3 - 2) ** 2])


def test_hinge():
    assert losses.hinge(PC, PR, RC, RR, beta=0.1).tolist() == pytest.approx([1 - 0.2, 1 - 0.3])
    assert losses.hinge(PC, PR, RC, RR, beta=1.0).tolist() == pytest.approx([0.0, 0.0])


def test_cpo_smooth():
    beta, gamma, alpha, tau = 0.5, 1.0, 2.0, 3.0
    got = losses.cpo(PC, PR, RC, RR, beta=beta, gamma=gamma, alpha=alpha, tau=tau)
    want = []
    for h, dr in zip(H, DELTA_REF):
        m = math.log1p(math.exp(tau * (gamma - dr))) / tau
        want.append(-logsig(beta * h - (beta / alpha) * m))
    assert got.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("gamma,alpha", [(-1e4, 1.0), (0.0, 1e12), (-50.0, 1e6)])
def test_cpo_reduces_to_dpo_when_constraint_vanishes(gamma, alpha):
    got = losses.cpo(PC, PR, RC, RR, beta=0.5, gamma=gamma, alpha=alpha, tau=1.0)
    assert torch.allclose(got, losses.dpo(PC, PR, RC, RR, beta=0.5), atol=1e-9)


def test_cpo_penalises_pairs_the_reference_gets_wrong_more():
    dpo = losses.dpo(PC, PR, RC, RR, beta=0.5)
    cpo = losses.cpo(PC, PR, RC, RR, beta=0.5, gamma=1.0, alpha=1.0, tau=1.0)
    assert (cpo > dpo).all()
    assert (cpo - dpo)[1] > (cpo - dpo)[0]  # δ_ref = -4 is far below γ


def test_cpo_clip():
    beta = 0.5
    got = losses.cpo_clip(PC, PR, RC, RR, beta=beta)
    want = [-logsig(beta * (dp - max(0.0, dr))) for dp, dr in zip(DELTA_POLICY, DELTA_REF)]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_nll_is_per_token():
    assert losses.nll(t(-6.0, -2.0), t(3.0, 2.0)).tolist() == [2.0, 1.0]


def test_simpo_by_hand():
    """L = −log σ(β s_θ(y_w) − β s_θ(y_l) − γ_SimPO) on per-token averages; no reference anywhere."""
    beta, margin = 2.0, 0.5
    got = losses.simpo(PC, PR, beta=beta, margin=margin)
    want = [-logsig(beta * (c - r) - margin) for c, r in zip(PC.tolist(), PR.tolist())]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_orpo_by_hand():
    """L = −s_θ(y_w) − λ log σ(log odds(y_w) − log odds(y_l)), odds(y) = P/(1−P), P = exp s_θ(y)."""
    chosen, rejected, weight = t(-0.1, -2.0), t(-1.5, -0.01), 0.3

    def odds(s):
        return math.log(math.exp(s) / (1 - math.exp(s)))

    got = losses.orpo(chosen, rejected, beta=0.1, odds_ratio_weight=weight)
    want = [-c - weight * logsig(odds(c) - odds(r)) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # Stable at both ends: P → 1 (s → 0⁻) and P → 0 (s ≪ 0), where the naive log(1 − e^s) loses every digit.
    assert losses.log_odds(t(-1e-12, -60.0)).tolist() == pytest.approx([-math.log(1e-12), -60.0], rel=1e-6)


def test_kto_by_hand():
    """z_0 = max(0, mean(log π_θ(y') − log π_ref(y'))), detached; L = λ_D (1 − σ(β(r − z_0))) for a desirable y,
    λ_U (1 − σ(β(z_0 − r))) for an undesirable one, r = log π_θ(y) − log π_ref(y)."""
    policy, ref = t(-2.0, -5.0, -1.0), t(-3.0, -4.0, -1.0)  # r = 1, −1, 0
    policy_kl, ref_kl = t(-4.0, -6.0, -2.0), t(-5.0, -6.0, -2.5)  # mean(KL) = 0.5
    desirable = torch.tensor([True, False, False])
    beta, weights = 0.5, {"desirable_weight": 1.5, "undesirable_weight": 0.5}
    got = losses.kto(policy, policy_kl, ref, ref_kl, desirable, beta=beta, **weights)

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    want = [1.5 * (1 - sigmoid(0.5 * (1 - 0.5))), 0.5 * (1 - sigmoid(0.5 * (0.5 + 1))), 0.5 * (1 - sigmoid(0.25))]
    assert got.tolist() == pytest.approx(want, abs=1e-12)
    # The reference point is never negative, and no gradient flows through it.
    assert losses.kto_reference_point(t(-9.0), t(-1.0)).item() == 0.0
    trained, kl = policy.clone().requires_grad_(), policy_kl.clone().requires_grad_()
    losses.kto(trained, kl, ref, ref_kl, desirable, beta=beta, **weights).sum().backward()
    assert kl.grad is None and trained.grad is not None
    # Through the objective: declared unpaired, it needs the labels.
    cfg = LossConfig(type="kto", beta=beta, **weights)
    logps = losses.PairLogps(policy, policy_kl, ref, ref_kl, t(1.0, 1.0, 1.0), t(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="loss.type kto takes labelled unpaired completions"):
        losses.objective(cfg, logps)
    terms = losses.objective(cfg, dataclasses.replace(logps, desirable=desirable))
    assert terms.loss.tolist() == pytest.approx(want, abs=1e-12) and terms.desirable is desirable
    # What it reports: rewards and log-probs by label (as TRL's KTOTrainer), the KL estimate; no preference.
    meter = IntervalMeter()
    meter.add(terms, tokens=6, beta=beta)
    row = meter.reduce(started=0.0, clock=lambda: 1.0)
    assert row["rewards/chosen"] == 0.5 and row["rewards/rejected"] == pytest.approx(-0.25)
    assert row["logps/chosen"] == -2.0 and row["logps/rejected"] == -3.0 and row["kl"] == 0.5
    assert not {"pref/absolute_accuracy", "pref/frac_in_U", "rewards/accuracies", "rewards/margins"} & set(row)


def _trls_kto_loss(cfg: LossConfig, logps: losses.PairLogps) -> torch.Tensor:
    """TRL 1.16's KTOTrainer._compute_loss, its own code (it has no separate loss function), on given log-probs: a
    stand-in model returns the completions' (or, called on the KL inputs, the KL completions') summed log-probs as
    a fused LM head's per-token log-probs (the sum in the first position, zeros after), the reference's come
    precomputed (``ref_logps``, ``ref_KL_logps``), one process."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.kto_trainer import KTOTrainer

    rows, width = len(logps.policy_chosen), 3
    zeros = torch.zeros(rows, width - 1)

    def outputs(summed):
        per_token = torch.cat([summed[:, None], torch.zeros(rows, width - 2)], dim=1)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros)

    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1, 1]] * rows),
        "KL_input_ids": torch.ones(rows, width, dtype=torch.long),
        "KL_attention_mask": torch.ones(rows, width, dtype=torch.long),
        "KL_completion_mask": torch.tensor([[0, 1, 1]] * rows),
        "label": logps.desirable,
        "ref_logps": logps.ref_chosen,
        "ref_KL_logps": logps.ref_rejected,
    }

    def model(input_ids, **_):
        return outputs(logps.policy_rejected if input_ids is inputs["KL_input_ids"] else logps.policy_chosen)

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x),
        calculate_KL=True,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        loss_type="kto",
        beta=cfg.beta,
        desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    trainer._compute_kl_logps = KTOTrainer._compute_kl_logps.__get__(trainer)
    return KTOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kto_equals_trls_kto_trainer_on_the_same_logps(seed):
    """rayalign's objective for loss.type kto against TRL 1.16's KTOTrainer loss code, on the same summed
    log-probs of completions and KL completions and the same labels: the batch mean and its gradient agree to
    1e-6 (float32, as both compute)."""
    pytest.importorskip("trl", reason="TRL is installed by `make install-bench`")
    generator = torch.Generator().manual_seed(seed)
    size = 16

    def logp():
        return -30 * torch.rand(size, generator=generator)

    policy = logp().requires_grad_()
    tokens = torch.ones(size)
    desirable = torch.rand(size, generator=generator) < 0.6
    logps = losses.PairLogps(policy, logp(), logp(), logp(), tokens, tokens, desirable)
    for beta, weights in ((0.1, (1.0, 1.0)), (0.5, (1.33, 0.7))):
        cfg = LossConfig(type="kto", beta=beta, desirable_weight=weights[0], undesirable_weight=weights[1])
        values = (_trls_kto_loss(cfg, logps), losses.objective(cfg, logps).loss.mean())
        assert torch.allclose(values[0], values[1], rtol=0, atol=1e-6), (beta, values)
        grads = [torch.autograd.grad(value, policy)[0] for value in values]
        assert torch.allclose(grads[0], grads[1], rtol=0, atol=1e-6), beta


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_simpo_and_orpo_equal_trl_on_the_same_logps(seed):
    """TRL 1.16's own loss code (CPOTrainer.cpo_loss with loss_type simpo; ORPOTrainer.odds_ratio_loss), called on
    the same per-token average log-probs: values and gradients agree to 1e-6. TRL's ORPO term is the odds ratio
    alone (its NLL is the batch's token mean, computed apart), so the comparison takes rayalign's NLL term off."""
    pytest.importorskip("trl", reason="TRL is installed by `make install-bench`")
    from types import SimpleNamespace

    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    generator = torch.Generator().manual_seed(seed)
    # ORPO's TRL code computes in float32 whatever it gets: both sides take float32 log-probs.
    chosen = (-4 * torch.rand(64, generator=generator) - 1e-3).requires_grad_()
    rejected = (-4 * torch.rand(64, generator=generator) - 1e-3).requires_grad_()
    device = SimpleNamespace(device=torch.device("cpu"))
    cpo_self = SimpleNamespace(
        loss_type="simpo", beta=2.0, simpo_gamma=0.8, label_smoothing=0.0, alpha=0.0, accelerator=device
    )
    orpo_self = SimpleNamespace(beta=0.25, accelerator=device)  # TRL's ORPO beta is the paper's λ
    pairs = {
        "simpo": (CPOTrainer.cpo_loss(cpo_self, chosen, rejected)[0], losses.simpo(chosen, rejected, 2.0, 0.8)),
        "orpo": (
            -ORPOTrainer.odds_ratio_loss(orpo_self, chosen, rejected)[0],
            losses.orpo(chosen, rejected, beta=0.1, odds_ratio_weight=0.25) + chosen,
        ),
    }
    for name, (theirs, ours) in pairs.items():
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6), name
        grads = [torch.autograd.grad(value.sum(), (chosen, rejected)) for value in (theirs, ours)]
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), name


def _trls_dpo_loss(loss_type: str, beta: float, logps: losses.PairLogps) -> torch.Tensor:
    """TRL 1.16's DPOTrainer._compute_loss, its own code, on given log-probs: a stand-in model returns them as the
    per-token log-probs of a fused LM head (each sequence's sum in its first position, zeros elsewhere, as TRL
    sums a row whole), and the reference's come precomputed, as `precompute_ref_logps` passes them."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    lengths = torch.cat([logps.chosen_tokens, logps.rejected_tokens]).long()
    rows, width = len(lengths), int(lengths.max()) + 1  # one prompt token, then the completion
    completion_mask = (torch.arange(width) >= 1) & (torch.arange(width) <= lengths[:, None])
    summed = torch.cat([logps.policy_chosen, logps.policy_rejected])
    per_token = torch.cat([summed[:, None], torch.zeros(rows, width - 2)], dim=1)
    zeros = torch.zeros(rows, width - 1)
    outputs = SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.zeros(rows, width, dtype=torch.long),
        "attention_mask": torch.ones(rows, width, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "ref_chosen_logps": logps.ref_chosen,
        "ref_rejected_logps": logps.ref_rejected,
    }
    return DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, return_outputs=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpo_ipo_and_hinge_equal_trls_dpo_trainer_on_the_same_logps(seed):
    """rayalign's whole objective (losses.objective) against TRL 1.16's DPOTrainer loss code, on the same summed
    log-probs and response lengths: the batch mean and its gradients agree to 1e-6 for DPO (TRL's `sigmoid`), the
    hinge and IPO. TRL's IPO divides each log-ratio by its response's token count (the IPO authors' form, per its
    comment): rayalign's IPO with `loss.length_normalize` is the same loss."""
    pytest.importorskip("trl", reason="TRL is installed by `make install-bench`")
    generator = torch.Generator().manual_seed(seed)
    size = 16

    def logp():
        return -30 * torch.rand(size, generator=generator, dtype=torch.float64)

    def tokens():
        return torch.randint(1, 13, (size,), generator=generator).double()

    chosen, rejected = logp().requires_grad_(), logp().requires_grad_()
    logps = losses.PairLogps(chosen, rejected, logp(), logp(), tokens(), tokens())
    for ours, theirs, beta in (("dpo", "sigmoid", 0.1), ("hinge", "hinge", 0.3), ("ipo", "ipo", 0.5)):
        cfg = LossConfig(type=ours, beta=beta, length_normalize=ours == "ipo")
        values = (_trls_dpo_loss(theirs, beta, logps), losses.objective(cfg, logps).loss.mean())
        assert torch.allclose(values[0], values[1], rtol=0, atol=1e-6), ours
        grads = [torch.autograd.grad(value, (chosen, rejected)) for value in values]
        for a, b in zip(*grads):
            assert torch.allclose(a, b, rtol=0, atol=1e-6), ours


def test_a_reference_free_loss_is_declared_so_and_computed_without_one():
    from rayalign.loss_specs import LOSSES

    assert {name for name, spec in LOSSES.items() if not spec.needs_reference} == {"simpo", "orpo"}
    lengths_w, lengths_l = t(2.0, 4.0), t(1.0, 2.0)
    terms = losses.objective(
        LossConfig(type="simpo", beta=2.0), losses.PairLogps(PC, PR, None, None, lengths_w, lengths_l)
    )
    # Per-token averages whatever loss.length_normalize says: s(y_w) = (-1/2, -5/4), s(y_l) = (-3, -2).
    assert terms.compared[0].tolist() == [-0.5, -1.25] and terms.compared[2] is None
    assert terms.loss.tolist() == pytest.approx([-logsig(2.0 * 2.5 - 0.5), -logsig(2.0 * 0.75 - 0.5)], abs=1e-12)
    with pytest.raises(ValueError, match="loss.type dpo needs reference log-probs and the batch has none"):
        losses.objective(LossConfig(), losses.PairLogps(PC, PR, None, None, lengths_w, lengths_l))
    # The statistics that need a reference are left out, never reported as 0.
    meter = IntervalMeter()
    meter.add(terms, tokens=4, beta=2.0)
    row = meter.reduce(started=0.0, clock=lambda: 1.0)
    assert row["pref/absolute_accuracy"] == 1.0 and "pref/frac_in_U" not in row and "rewards/chosen" not in row
    # ... and a held-out interval that has the reference reports them over the pairs that had it.
    meter.add(terms, tokens=4, beta=2.0)
    meter.add(losses.ObjectiveTerms(t(1.0, 3.0), (PC, PR, RC, RR)), tokens=10, beta=0.5)
    row = meter.reduce(started=0.0, clock=lambda: 1.0)
    assert row["pref/frac_in_U"] == 0.5 and row["pref/absolute_accuracy"] == 0.75 and row["pairs/s"] == 4.0


@pytest.mark.parametrize("kind", ["dpo", "ipo", "hinge", "cpo", "cpo_clip", "simpo", "orpo"])
def test_preference_loss_dispatch(kind):  # kto: test_kto_by_hand
    cfg = LossConfig(type=kind, beta=0.5, **({"gamma": 1.0} if kind == "cpo" else {}))
    scale = 8 if kind == "orpo" else 1  # ORPO's odds need probabilities, not summed log-probs
    got = losses.preference_loss(cfg, PC / scale, PR / scale, RC, RR)
    direct = {
        "dpo": lambda: losses.dpo(PC, PR, RC, RR, beta=0.5),
        "ipo": lambda: losses.ipo(PC, PR, RC, RR, beta=0.5),
        "hinge": lambda: losses.hinge(PC, PR, RC, RR, beta=0.5),
        "cpo": lambda: losses.cpo(PC, PR, RC, RR, beta=0.5, gamma=1.0, alpha=1.0, tau=1.0),
        "cpo_clip": lambda: losses.cpo_clip(PC, PR, RC, RR, beta=0.5),
        "simpo": lambda: losses.simpo(PC, PR, beta=0.5, margin=0.5),
        "orpo": lambda: losses.orpo(PC / 8, PR / 8, beta=0.5, odds_ratio_weight=0.1),
    }[kind]()
    assert torch.equal(got, direct)


def test_preference_stats_and_meter():
    stats = preference_stats((PC, PR, RC, RR), beta=0.5)
    assert stats["rewards/chosen"].tolist() == [0.5, 0.5]
    assert stats["rewards/rejected"].tolist() == [-0.5, -1.0]
    assert stats["rewards/accuracies"].tolist() == [1.0, 1.0]
    assert stats["pref/absolute_accuracy"].tolist() == [1.0, 0.0]
    assert stats["pref/frac_in_U"].tolist() == [0.0, 1.0]
    meter = IntervalMeter()
    meter.add(losses.ObjectiveTerms(t(1.0, 3.0), (PC, PR, RC, RR)), tokens=10, beta=0.5)
    row = meter.reduce(started=0.0, clock=lambda: 2.0)
    assert row["loss"] == 2.0 and row["pref/frac_in_U"] == 0.5 and row["pairs/s"] == 1.0 and row["tokens/s"] == 5.0
    assert meter.reduce(started=0.0, clock=lambda: 1.0)["pairs/s"] == 0.0  # reset after reduce


def test_objective_length_normalizes_and_adds_the_nll_term():
    lengths_w, lengths_l = t(2.0, 4.0), t(1.0, 2.0)
    scores = losses.PairLogps(PC, PR, RC, RR, lengths_w, lengths_l)
    plain = losses.objective(LossConfig(beta=0.5), scores)
    assert torch.equal(plain.loss, losses.dpo(PC, PR, RC, RR, beta=0.5))
    assert all(torch.equal(a, b) for a, b in zip(plain.compared, (PC, PR, RC, RR)))

    cfg = LossConfig(beta=0.5, length_normalize=True, nll_weight=0.3)
    terms = losses.objective(cfg, scores)
    # pair 0: per-token s_θ(y_w) = -1/2, s_θ(y_l) = -3/1, s_ref(y_w) = -2/2, s_ref(y_l) = -2/1 → h = 2.5 - 1 = 1.5
    # pair 1: -5/4, -4/2, -6/4, -2/2 → h = 0.75 - (-0.5) = 1.25; nll = -log π(y_w) / |y_w| on sums
    expected = [-logsig(0.5 * 1.5) + 0.3 * 0.5, -logsig(0.5 * 1.25) + 0.3 * 1.25]
    assert terms.loss.tolist() == pytest.approx(expected, abs=1e-12)
    assert terms.compared[0].tolist() == [-0.5, -1.25] and terms.compared[3].tolist() == [-2.0, -1.0]


def test_exact_analysis_uses_the_whole_objective():
    """The two-response population loss honours nll_weight (a single-token response: length 1)."""
    from rayalign.diagnostics.pathology import population_loss

    delta = t(-1.0, 0.5)
    base = population_loss(LossConfig(beta=1.0), delta)
    with_nll = population_loss(LossConfig(beta=1.0, nll_weight=0.5), delta)
    # q·(−log σ(δ)) + (1−q)·(−log σ(−δ)), q = 0.7, weighted by λ = 0.5
    nll = [0.7 * -logsig(d) + 0.3 * -logsig(-d) for d in (-1.0, 0.5)]
    assert (with_nll - base).tolist() == pytest.approx([0.5 * v for v in nll], abs=1e-12)
    assert torch.equal(population_loss(LossConfig(beta=1.0, length_normalize=True), delta), base)
