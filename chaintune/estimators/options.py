"""The estimators' options, declared once (torch-free: the CLI builds its flags from them before loading torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from chaintune.options import option

RLR, HO, ZO, REL = ("rlr",), ("half-order",), ("zeroth-order",), ("rlr-released",)
PPO = ("reinforce", "grpo")
REUSE_ROLLOUT = ("off", "per-sample", "graph")  # how PPO's first epoch gets its gradient (reuse_rollout)
# estimators whose likelihood-ratio terms may use DDPO's per-prompt stat tracker (--baseline tracker)
TRACKED = ("rlr", "rlr-released", "half-order", "reinforce")


@dataclass
class EstimatorConfig:
    """Which gradient estimator, and its options: the one place their defaults are declared.

    Each option names the estimators that read it (``used_by``: ``--help`` shows them, ``[estimator: rlr]``); an
    estimator class takes its option list from there (:func:`takes`) and its constructor's defaults from
    :data:`DEFAULTS`, so ``chaintune align --estimator E``, a config file and ``get_estimator(E)`` /
    ``chaintune.estimate_gradient(model, reward, E)`` build the same estimator. One flat section rather than one
    per estimator: a third of the options are shared (sigma, the PPO clip, the tracker, ...), and a section per
    estimator would declare each of those two to four times."""

    name: str = option("rlr", "rlr | rlr-released | half-order | reinforce (= ddpo) | grpo | zeroth-order | "
                       "full-backprop | truncated-backprop | alignprop | refl | nft (DiffusionNFT) | dpo (online "
                       "Diffusion-DPO). rlr with h = 1, spans = 1 and no ZO "
                       "computes the same gradient as rlr-released at its defaults, bit for bit.",
                       key="estimator")
    h: int = option(1, "Span length (steps of backprop inside the likelihood-ratio span).", min=1,
                    used_by=RLR + HO)
    j: str = option("uniform", "Span placement: uniform | grad-norm | a,b (paper steps; diffusive chain of "
                    "thought).", used_by=RLR)
    sigma: float = option(1e-3, "Perturbation scale of the zeroth-order terms.", gt=0, used_by=RLR + ZO)
    # Off by default: with >= 1e4 trainable parameters the ZO terms multiply the estimate's variance by ~d*T and
    # stall training (docs/results.md, "RLR in practice"); the authors' released code omits them too.
    zo: bool = option(False, "Zeroth-order on all remaining steps (the paper's unbiased eq. 6; high variance at "
                      "large d).", used_by=RLR)
    ho: bool = option(True, "The half-order span (--no-ho = the paper's 'without HO' ablation).", used_by=RLR)
    fo: bool = option(True, "The first-order last step (--no-fo: an ablation that leaves step 1 out; with --no-ho "
                      "and --no-zo it isolates one term, e.g. to measure its signal-to-noise ratio).", used_by=RLR)
    # benchmarks/defaults.py: 4 spans (with j uniform, lr 1e-4, cosine, 150 steps, KL 0.01): 94-95% on digit:1,7;
    # 1 span: nn-distance 1.4-1.6x the base's at step 25 on digit:4,7,9 (the hacking guard rolls such runs back)
    spans: int = option(4, "Independent half-order spans averaged per sample (unbiased; lowers variance).", min=1,
                        used_by=RLR)
    shared_perturbation: bool = option(False, "One perturbation direction for all zeroth-order steps.",
                                       used_by=RLR + ZO)
    k: int = option(1, "Number of final steps to backpropagate through.", min=1,
                    used_by=("truncated-backprop", "alignprop"))
    inner_epochs: int = option(1, "PPO inner epochs per batch.", min=1, used_by=PPO)
    clip_range: float = option(1e-4, "PPO clip range of the ratio of per-dimension mean log-probs (DDPO / "
                               "Flow-GRPO's convention and default).", gt=0, used_by=PPO)
    # measured in benchmarks/peers.py (one DDPO iteration vs TRL 0.11; docs/results.md "Against the peer tools")
    reuse_rollout: str = option("off", "Take the first (on-policy) PPO epoch's gradient from the rollout instead of "
                                "recomputing every step's forward pass (the same gradient): per-sample (each "
                                "step's log-probs backpropagated while sampling into one gradient per sample; "
                                "memory of one step plus n copies of the trainable tensors, for LoRA/linear "
                                "layers; checked against autograd once, else it recomputes) | graph (keep every "
                                "step's graph until the reward: memory linear in the steps) | off. Not with "
                                "--kl-coef > 0.", choices=REUSE_ROLLOUT, used_by=PPO)
    kl_coef: float = option(0.0, "Weight of the per-step closed-form KL to the reference (base) policy "
                            "(Flow-GRPO's beta; needs the base model).", min=0, used_by=("grpo",))
    # Flow-GRPO's config_base.py: sample.global_std = True (its SD3 recipes keep it)
    global_std: bool = option(True, "Divide by the whole batch's reward std (Flow-GRPO's default) instead of each "
                              "group's (--no-global-std).", used_by=("grpo", "nft"))
    # benchmarks/chain_diagnostics.py and the video ranking (docs/results.md, "Which estimator when"): on
    # builtin:moving-digits a per-prompt baseline made DDPO learn prompt fidelity where the batch one did not; on a
    # model without prompts or labels it is the batch baseline exactly, so the image results are unchanged
    baseline: str = option("prompt", "Reward baseline of likelihood-ratio terms, leave-one-out (unbiased): prompt "
                           "(the other samples of the same prompt/label; align draws them in groups, see "
                           "--group-size; without conditions it is batch) | batch | none; normalised as the "
                           "references: group (GRPO: per-prompt mean/std in the batch) | tracker (DDPO: per-prompt "
                           "running buffer). grpo always uses group.",
                           choices=("prompt", "batch", "none", "group", "tracker"))
    kl_form: str = option("exact", "The KL's form: exact (the per-step Gaussian KL) | flow-grpo (Flow-GRPO's: "
                          "divided by its SDE coefficient g^2 instead of the step's variance, i.e. times |d sigma|; "
                          "flow models).", choices=("exact", "flow-grpo"), used_by=("grpo",))
    # DiffusionNFT's official code and Flow-Factory's NFTTrainingArguments: nft_beta 1.0
    nft_beta: float = option(1.0, "Beta: how far the implicit positive and negative policies lie from the "
                             "sampling policy (DiffusionNFT's default).", gt=0, used_by=("nft",))
    # Diffusion-DPO's SD-1.5 value, Flow-Factory's DPOTrainingArguments default
    dpo_beta: float = option(2000.0, "Beta of Diffusion-DPO's loss (on per-dimension mean squared errors).", gt=0,
                             used_by=("dpo",))
    train_timesteps: int = option(0, "Chain timesteps trained per rollout sample, drawn without replacement (0: "
                                  "every step of the chain, as the references train).", min=0,
                                  used_by=("nft", "dpo"))
    tracker_buffer: int = option(16, "Baseline tracker: rewards kept per prompt (DDPO: 16).", min=1,
                                 used_by=TRACKED)
    tracker_min_count: int = option(16, "Baseline tracker: below this many buffered rewards a prompt uses batch "
                                    "statistics (DDPO: 16).", min=0, used_by=TRACKED)
    final_eta: float | None = option(None, "Eta of the final first-order step (the release: 0; default: the "
                                     "chain's eta).", min=0, used_by=REL)
    chain_len: int = option(1, "Likelihood-ratio steps per estimate, uniform positions (the release: 2).", min=0,
                            used_by=REL)
    lr_clip_range: float = option(0.0, "PPO clip of each likelihood-ratio step on per-dimension mean log-probs "
                                  "(the release: 1e-4; 0: eq. 6's plain term).", min=0, used_by=REL)
    fo_coef: float = option(1.0, "Weight of the first-order term (the release's loss_coeff).", used_by=REL)
    lr_coef: float = option(1.0, "Weight of each likelihood-ratio step, 1 = unbiased (the release's ho_loss_coeff "
                            "c on its per-dimension loss is c / (D * std R)).", used_by=REL)


DEFAULTS = EstimatorConfig()
"""The default of every estimator option: the estimators' constructors take theirs from here."""

# compare samples of one prompt (GRPO/NFT advantages, DPO pairs): align draws groups. Torch-free for the config's
# group-size default; the classes say it too (``Estimator.compares_group``), and tests/test_layers checks they agree
GROUPED = ("grpo", "nft", "dpo")


def takes(estimator: str) -> tuple[str, ...]:
    """The options ``estimator`` reads, in declaration order: those whose ``used_by`` names it."""
    return tuple(f.name for f in fields(EstimatorConfig) if estimator in f.metadata.get("used_by", ()))
