"""fastopt.torch inside training loops that fastopt did not write: Hugging Face's
``transformers.Trainer`` (through accelerate) and Lightning's ``Trainer``.

Each client runs a fastopt.torch optimizer and, in the very same arrangement, its
torch.optim namesake: with the client's own gradient clipping and a warmup schedule, the
two end with the same parameters (also a Llama built from its config, with tied embeddings
and the Trainer's decay / no-decay groups). Each client's checkpoint (``torch.save`` of
``state_dict()``, a ``weights_only`` ``torch.load`` into ``load_state_dict()``) resumes
training bit for bit as an uninterrupted run does, with torch.optim as the control, and the
Trainer's resumes across the two libraries. A bfloat16 model with float32 master weights (and
8-bit state where a tensor is large enough; in the Trainer also master remainders, and no
master with stochastic rounding) trains in both clients and resumes bit for bit; its
parameters are the master rounded to nearest even, and the master follows float32
torch.optim.AdamW run on the same clipped gradients, recorded right before each step.
Lightning's ``precision="bf16-true"`` steps as a bfloat16 model does.

The clients are optional: without transformers/accelerate or lightning their tests skip.
Tiny models, a dozen steps each: the file takes about 25 s on two cores.
"""

import math
import os
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import fastopt.precision  # noqa: E402
import fastopt.torch as ft  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec:FutureWarning")

WIDTH = 64           # the middle Linear's weight has 64 * 64 = 4096 elements: 8-bit state
IN, OUT = 8, 2
ROWS, BATCH = 48, 8  # 6 steps an epoch
STEPS = 12
WARMUP = 3
LR, WD = 1e-2, 0.1
CLIP = 0.5           # below the first steps' gradient norms, so clipping engages
RTOL, ATOL = 1e-6, 2e-7  # float32 parity after STEPS steps (they differ by an ulp or two)


# -- the model, the data, the optimizers ----------------------------------------------------

class Net(torch.nn.Module):
    """A regression MLP, without dropout or any other randomness in its forward pass, that
    returns ``{"loss": ...}`` as transformers' models do."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN, WIDTH), torch.nn.Tanh(),
            torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh(),
            torch.nn.Linear(WIDTH, OUT))
        self.to(dtype)

    def forward(self, x, labels=None):
        out = self.net(x.to(self.net[0].weight.dtype)).float()
        result = {"logits": out}
        if labels is not None:
            result["loss"] = torch.nn.functional.mse_loss(out, labels)
        return result


def data(rows=ROWS, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN, generator=g, dtype=torch.float32)
    y = torch.tanh(x @ torch.randn(IN, OUT, generator=g, dtype=torch.float32)) * 3
    return x, y


def make_optimizer(impl, params, **kwargs):
    if impl == "fastopt":
        return ft.AdamW(params, lr=LR, weight_decay=WD, **kwargs)
    return torch.optim.AdamW(params, lr=LR, weight_decay=WD, foreach=False)


def warmup_then_linear(step, total=STEPS):
    """transformers' get_linear_schedule_with_warmup's factor, written out for Lightning."""
    if step < WARMUP:
        return step / max(1, WARMUP)
    return max(0.0, (total - step) / max(1, total - WARMUP))


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(ours, theirs, rtol=RTOL, atol=ATOL):
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{k}: {m}")


def assert_bitwise(ours, theirs, what="parameter"):
    assert ours.keys() == theirs.keys()
    for k in ours:
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype and a.shape == b.shape, (what, k)
        assert torch.equal(bits(a), bits(b)), \
            f"{what} {k} differs: max |diff| {(a.float() - b.float()).abs().max().item()}"


def bits(t):
    """A tensor's bytes, so that equal means bit for bit (NaN and -0.0 too)."""
    t = t.detach().contiguous().reshape(-1)
    return t if t.dtype == torch.bool else t.view(torch.uint8)


def assert_moved(before, after):
    for k in before:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"


def optimizer_state(opt):
    """Every tensor of the optimizer's state, by parameter index, cloned."""
    index = {p: i for i, p in enumerate(p for g in opt.param_groups for p in g["params"])}
    out = {}
    for p, state in opt.state.items():
        for name, value in state.items():
            if torch.is_tensor(value):
                out[f"{index[p]}.{name}"] = value.detach().clone()
    return out


def assert_master_rounds_into_the_model(model, opt):
    """Every bfloat16 parameter is its float32 master rounded to nearest even."""
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        master = opt.state[p]["master"]
        assert master.dtype == torch.float32, name
        rounded = master.to(torch.bfloat16)
        assert torch.equal(p.detach().view(torch.int16), rounded.view(torch.int16)), name


def masters(model, opt):
    return {name: opt.state[p]["master"].detach().clone() for name, p in model.named_parameters()}


def float32_masters(model, opt):
    """The float32 master weights, rebuilt from the parameters' bits where the optimizer
    keeps only their low halves (master_weights="remainder")."""
    out = {}
    for name, p in model.named_parameters():
        master = opt.state[p]["master"].detach()
        if master.dtype == torch.int16:
            bits = p.detach().contiguous().view(torch.int16).numpy().view(np.uint16)
            master = torch.from_numpy(fastopt.precision.rebuild_master(
                bits, master.contiguous().numpy().view(np.uint16))).reshape(p.shape)
        out[name] = master.clone()
    return out


def assert_follows_float32_adamw(model, opt, replay, state_dtype):
    """The float32 master weights are torch.optim.AdamW's in float32 on the same gradients:
    within float32 parity where the state is float32 (also the 8-bit optimizer's tensors
    of fewer than 4096 elements), within 8-bit error where it is 8-bit (bitsandbytes'
    AdamW8bit errs as much here: a mean of 4e-4 and at most 3e-3, for moves of 0.06)."""
    assert len(replay.steps) == STEPS
    expected = replay.run()
    ours = masters(model, opt)
    for name, p in model.named_parameters():
        if state_dtype == "int8" and p.numel() >= 4096:
            assert opt.state[p]["exp_avg"].dtype == torch.uint8, name
            error = (ours[name] - expected[name]).abs()
            moved = (expected[name] - replay.initial[name]).abs().max()
            assert moved > 0.03 and error.mean() < 2e-3 and error.max() < 1e-2, (name, error)
        else:
            assert opt.state[p]["exp_avg"].dtype == torch.float32, name
            torch.testing.assert_close(ours[name], expected[name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{name}: {m}")


class Replay:
    """Records, right before each optimizer step, the gradients the optimizer is about to
    read (after the client's clipping) and the learning rate of the step, then runs
    torch.optim.AdamW (single-tensor, float32) on float32 copies of the initial weights with
    those gradients upcast: what the master weights should follow."""

    def __init__(self, model):
        self.initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        self.steps = []

    def record(self, model, opt):
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()}
        self.steps.append((opt.param_groups[0]["lr"], grads))

    def run(self):
        params = {n: torch.nn.Parameter(t.clone()) for n, t in self.initial.items()}
        opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=WD, foreach=False)
        for lr, grads in self.steps:
            for group in opt.param_groups:
                group["lr"] = lr
            for n, p in params.items():
                p.grad = grads[n]
            opt.step()
        return {n: p.detach() for n, p in params.items()}


# -- Hugging Face transformers.Trainer -------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers", exc_type=ImportError)
    pytest.importorskip("accelerate", exc_type=ImportError)
    return transformers


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = data()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_trainer(hf, model, opt, out, max_steps=STEPS, save_steps=None, callbacks=()):
    args = hf.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=BATCH,
        max_grad_norm=CLIP, logging_steps=1, report_to="none", use_cpu=True,
        dataloader_num_workers=0, seed=0, data_seed=0, disable_tqdm=True,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        save_only_model=False, remove_unused_columns=False)
    scheduler = hf.get_linear_schedule_with_warmup(opt, num_warmup_steps=WARMUP,
                                                   num_training_steps=STEPS)
    return hf.Trainer(model=model, args=args, train_dataset=Rows(),
                      optimizers=(opt, scheduler), callbacks=list(callbacks))


def hf_train(hf, impl, out, dtype=torch.float32, resume=None, save_steps=None, replay=False,
             **kwargs):
    """Trains a fresh Net with ``impl``'s AdamW in a transformers.Trainer; returns the
    model, the optimizer, the Trainer and the replay. The same initial weights every call
    but a resumed one, whose weights must come from the checkpoint, as after a restart."""
    model = Net(dtype, seed=0 if resume is None else 1)
    opt = make_optimizer(impl, model.parameters(), **kwargs)
    recorder = Replay(model) if replay else None
    callbacks = []
    if recorder is not None:
        class Record(hf.TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                recorder.record(model, opt)
        callbacks.append(Record())
    trainer = hf_trainer(hf, model, opt, out, save_steps=save_steps, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, opt, trainer, recorder


def grad_norms(trainer):
    return [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]


def losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_hf_trainer_with_clipping_and_warmup_trains_as_torch_adamw(hf, tmp_path):
    initial = weights(Net())
    ours, opt, trainer, _ = hf_train(hf, "fastopt", tmp_path / "fastopt")
    theirs, _, reference, _ = hf_train(hf, "torch", tmp_path / "torch")
    assert isinstance(opt, ft.AdamW)
    assert trainer.state.global_step == reference.state.global_step == STEPS
    norms = grad_norms(reference)
    assert len(norms) == STEPS and max(norms) > CLIP  # the Trainer's clipping engaged
    assert_moved(initial, weights(ours))
    assert_close(weights(ours), weights(theirs))
    assert losses(trainer) == pytest.approx(losses(reference), rel=1e-5)


@pytest.mark.parametrize("impl", ["torch", "fastopt"])
def test_hf_trainer_resume_from_checkpoint_matches_an_uninterrupted_run(hf, tmp_path, impl):
    """torch.optim is the control: if it did not resume bit for bit, the test, not fastopt,
    would be wrong. Checkpoint 7 lies in the second epoch, so the Trainer skips batches."""
    whole, opt, reference, _ = hf_train(hf, impl, tmp_path / "whole", save_steps=7)
    checkpoint = tmp_path / "whole" / "checkpoint-7"
    assert (checkpoint / "optimizer.pt").is_file()
    resumed, opt2, trainer, _ = hf_train(hf, impl, tmp_path / "resumed", save_steps=7,
                                         resume=str(checkpoint))
    assert trainer.state.global_step == STEPS
    assert losses(trainer) == losses(reference)  # the first 7 from the checkpoint's state
    assert_bitwise(weights(resumed), weights(whole))
    assert_bitwise(optimizer_state(opt2), optimizer_state(opt), "state")


@pytest.mark.parametrize("saved_by, resumed_by", [("torch", "fastopt"), ("fastopt", "torch")])
def test_hf_trainer_resumes_across_libraries(hf, tmp_path, saved_by, resumed_by):
    """optimizer.pt written by one library's AdamW resumes in the other's, and training goes
    on as the uninterrupted run of the library that wrote it."""
    whole, _, _, _ = hf_train(hf, saved_by, tmp_path / "whole", save_steps=7)
    resumed, opt, trainer, _ = hf_train(hf, resumed_by, tmp_path / "resumed", save_steps=7,
                                        resume=str(tmp_path / "whole" / "checkpoint-7"))
    assert trainer.state.global_step == STEPS
    assert all(int(state["step"]) == STEPS for state in opt.state.values())
    assert_close(weights(resumed), weights(whole))


BF16_CONFIGS = {
    "master": dict(),  # master_weights="auto": float32 master weights
    "master-int8": dict(state_dtype="int8"),
    "remainder": dict(master_weights="remainder"),
    "stochastic": dict(master_weights=None, state_dtype="bfloat16", stochastic_rounding=True),
}


@pytest.mark.parametrize("config", BF16_CONFIGS)
def test_hf_trainer_bfloat16_model(hf, tmp_path, config):
    """A bfloat16 model trains in the Trainer, and its checkpoint resumes bit for bit: the
    master weights (or their low halves), the 8-bit codes and scales, and the step counts
    that stochastic rounding draws its bits from go through optimizer.pt. The master
    weights follow float32 AdamW on the Trainer's clipped gradients."""
    kwargs = BF16_CONFIGS[config]
    model, opt, trainer, replay = hf_train(hf, "fastopt", tmp_path / "whole",
                                           dtype=torch.bfloat16, save_steps=7, replay=True,
                                           **kwargs)
    trained = losses(trainer)
    assert len(trained) == STEPS and trained[-1] < 0.7 * trained[0]
    if config.startswith("master"):
        assert_master_rounds_into_the_model(model, opt)
        assert_follows_float32_adamw(model, opt, replay, kwargs.get("state_dtype", "float32"))
    elif config == "remainder":
        # the parameters' bits and the remainders give float32 AdamW's master weights
        for name, p in model.named_parameters():
            assert opt.state[p]["master"].dtype == torch.int16, name
        assert_close(float32_masters(model, opt), replay.run())
    else:
        # no master weights: stochastic rounding reaches the kernels through the client
        nearest, _, _, _ = hf_train(hf, "fastopt", tmp_path / "nearest", dtype=torch.bfloat16,
                                    **dict(kwargs, stochastic_rounding=False))
        assert all("master" not in opt.state[p] for p in model.parameters())
        assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), nearest.parameters()))

    resumed, opt2, trainer2, _ = hf_train(hf, "fastopt", tmp_path / "resumed",
                                          dtype=torch.bfloat16, save_steps=7,
                                          resume=str(tmp_path / "whole" / "checkpoint-7"),
                                          **kwargs)
    assert trainer2.state.global_step == STEPS
    assert losses(trainer2) == trained  # the first 7 from the checkpoint's trainer state
    assert_bitwise(weights(resumed), weights(model))
    assert_bitwise(optimizer_state(opt2), optimizer_state(opt), "state")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, vocab):
        self.ids = torch.randint(0, vocab, (32, 16), generator=torch.Generator().manual_seed(3))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def hf_llama(hf, impl, out):
    """A one-layer Llama built from its config (no download), with tied embeddings, trained
    by ``impl``'s AdamW on the Trainer's own split of weights with and without decay."""
    torch.manual_seed(0)
    config = hf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=32, tie_word_embeddings=True)
    model = hf.LlamaForCausalLM(config)
    args = hf.TrainingArguments(
        output_dir=str(out), max_steps=8, per_device_train_batch_size=4, max_grad_norm=CLIP,
        logging_steps=1, report_to="none", use_cpu=True, dataloader_num_workers=0, seed=0,
        disable_tqdm=True, save_strategy="no")
    decay = set(hf.Trainer(model=model, args=args).get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": WD},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    assert groups[0]["params"] and groups[1]["params"]
    opt = (ft.AdamW(groups, lr=LR) if impl == "fastopt"
           else torch.optim.AdamW(groups, lr=LR, foreach=False))
    scheduler = hf.get_linear_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    trainer = hf.Trainer(model=model, args=args, train_dataset=Tokens(config.vocab_size),
                         optimizers=(opt, scheduler))
    trainer.train()
    return model, trainer


def test_hf_trainer_llama_from_config_trains_as_torch_adamw(hf, tmp_path):
    ours, trainer = hf_llama(hf, "fastopt", tmp_path / "fastopt")
    theirs, reference = hf_llama(hf, "torch", tmp_path / "torch")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # tied: one parameter
    assert max(grad_norms(reference)) > CLIP
    assert_close(weights(ours), weights(theirs))
    assert losses(trainer) == pytest.approx(losses(reference), rel=1e-5)


# -- Lightning --------------------------------------------------------------------------------

EPOCH = ROWS // BATCH  # 6 steps
SAVED = 5              # the step of the Lightning checkpoint resumed from: mid-epoch


@pytest.fixture(scope="module")
def pl():
    lightning = pytest.importorskip("lightning", exc_type=ImportError)
    return lightning.pytorch


def lightning_module(pl, impl, dtype=torch.float32, replay=False, seed=0, **kwargs):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Net(dtype, seed)
            self.replay = Replay(self.model) if replay else None
            self.losses = []

        def training_step(self, batch, batch_idx):
            x, y = lightning_batch(self.trainer.global_step)
            loss = self.model(x, y)["loss"]
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self):
            self.opt = make_optimizer(impl, self.model.parameters(), **kwargs)
            scheduler = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_then_linear)
            return {"optimizer": self.opt,
                    "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            if self.replay is not None:  # the gradients the step will read, clipped
                self.replay.record(self.model, self.opt)

    return Module()


def lightning_batch(step):
    """The batch of a global step. Lightning restarts a dataloader that is not resumable
    from its beginning on a resume (even from a checkpoint saved at an epoch's end, it
    replays one batch of the old epoch first), so the data follow the step count, which it
    restores, and its dataloader only counts the steps."""
    x, y = data()
    rows = slice((step % EPOCH) * BATCH, (step % EPOCH + 1) * BATCH)
    return x[rows], y[rows]


def lightning_train(pl, impl, out, dtype=torch.float32, resume=None, checkpoint_every=None,
                    replay=False, precision="32-true", **kwargs):
    pl.seed_everything(0, verbose=False)
    # a resumed run starts from other weights: they must come from the checkpoint
    module = lightning_module(pl, impl, dtype, replay, seed=0 if resume is None else 1, **kwargs)
    callbacks = []
    if checkpoint_every:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=str(out), every_n_train_steps=checkpoint_every, save_top_k=-1,
            filename="{step}"))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False,
        enable_checkpointing=bool(checkpoint_every), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=CLIP,
        gradient_clip_algorithm="norm", num_sanity_val_steps=0, default_root_dir=str(out),
        precision=precision)
    loader = torch.utils.data.DataLoader(range(EPOCH), batch_size=1, num_workers=0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|resumable"
                                                  "|callbacks used to create the checkpoint).*")
        # weights_only=True: torch.load's safe path, which Lightning does not take by itself
        trainer.fit(module, loader, ckpt_path=resume, weights_only=True if resume else None)
    return module, trainer


def test_lightning_with_clipping_and_warmup_trains_as_torch_adamw(pl, tmp_path):
    initial = weights(Net())
    ours, trainer = lightning_train(pl, "fastopt", tmp_path / "fastopt")
    theirs, reference = lightning_train(pl, "torch", tmp_path / "torch")
    assert isinstance(ours.opt, ft.AdamW)
    assert trainer.global_step == reference.global_step == STEPS
    assert_moved(initial, weights(ours.model))
    assert_close(weights(ours.model), weights(theirs.model))
    assert ours.losses == pytest.approx(theirs.losses, rel=1e-5)


def test_lightning_clipping_engages(pl, tmp_path):
    """Without this the parity above could hold with Lightning's clipping doing nothing."""
    clipped, _ = lightning_train(pl, "fastopt", tmp_path / "a", replay=True)
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
             for _, grads in clipped.replay.steps]
    assert len(norms) == STEPS
    assert max(norms) == pytest.approx(CLIP, rel=1e-4)  # clipped down to CLIP
    # and the clipped gradients are what fastopt stepped with
    assert_close({n: p.detach() for n, p in clipped.model.named_parameters()},
                 clipped.replay.run())


@pytest.mark.parametrize("impl", ["torch", "fastopt"])
def test_lightning_resume_from_checkpoint_matches_an_uninterrupted_run(pl, tmp_path, impl):
    whole, _ = lightning_train(pl, impl, tmp_path / "whole", checkpoint_every=SAVED)
    checkpoint = tmp_path / "whole" / f"step={SAVED}.ckpt"
    assert checkpoint.is_file(), os.listdir(tmp_path / "whole")
    resumed, trainer = lightning_train(pl, impl, tmp_path / "resumed", resume=str(checkpoint))
    assert trainer.global_step == STEPS
    assert len(resumed.losses) == STEPS - SAVED
    assert resumed.losses == whole.losses[SAVED:]
    assert_bitwise(weights(resumed.model), weights(whole.model))
    assert_bitwise(optimizer_state(resumed.opt), optimizer_state(whole.opt), "state")


@pytest.mark.parametrize("state_dtype", ["float32", "int8"])
def test_lightning_bfloat16_model_with_master_weights(pl, tmp_path, state_dtype):
    whole, _ = lightning_train(pl, "fastopt", tmp_path / "whole", dtype=torch.bfloat16,
                               checkpoint_every=SAVED, replay=True, state_dtype=state_dtype)
    assert whole.losses[-1] < 0.7 * whole.losses[0]
    assert_master_rounds_into_the_model(whole.model, whole.opt)
    assert_follows_float32_adamw(whole.model, whole.opt, whole.replay, state_dtype)
    resumed, trainer = lightning_train(pl, "fastopt", tmp_path / "resumed",
                                       dtype=torch.bfloat16, state_dtype=state_dtype,
                                       resume=str(tmp_path / "whole" / f"step={SAVED}.ckpt"))
    assert trainer.global_step == STEPS
    assert resumed.losses == whole.losses[SAVED:]
    assert_bitwise(weights(resumed.model), weights(whole.model))
    assert_bitwise(optimizer_state(resumed.opt), optimizer_state(whole.opt), "state")
    assert_master_rounds_into_the_model(resumed.model, resumed.opt)


def test_lightning_bf16_true_precision_steps_as_a_bfloat16_model(pl, tmp_path):
    """precision="bf16-true" casts the float32 module to bfloat16 before
    configure_optimizers builds the optimizer (and runs the forward pass with bfloat16 as
    the default dtype): the same as handing Lightning a bfloat16 model."""
    cast, _ = lightning_train(pl, "fastopt", tmp_path / "cast", precision="bf16-true")
    assert all(p.dtype == torch.bfloat16 for p in cast.model.parameters())
    bf16, _ = lightning_train(pl, "fastopt", tmp_path / "bf16", dtype=torch.bfloat16)
    assert cast.losses == bf16.losses
    assert_master_rounds_into_the_model(cast.model, cast.opt)
    assert_bitwise(weights(cast.model), weights(bf16.model))
    assert_bitwise(optimizer_state(cast.opt), optimizer_state(bf16.opt), "state")
