"""InternVLExpert on CPU with the small preset: training, evaluation, schedules and bad input."""

import copy
import json
import math
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, Dataset
from transformers import AutoProcessor, Qwen2Config, Qwen2ForCausalLM

from lightning_modules.internvl_module import InternVLExpert
from lightning_modules.predictions import read_predictions
from lightning_modules.presets import build_model_config

torch.set_num_threads(1)


class RepeatedBatch(Dataset):
    """The same collated batch `length` times (use with `DataLoader(batch_size=None)`)."""

    def __init__(self, batch: dict, length: int) -> None:
        self.batch = batch
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.batch


def loader(batch: dict, length: int = 1) -> DataLoader:
    return DataLoader(RepeatedBatch(batch, length), batch_size=None)


def make_expert(processor_dir, **kwargs) -> InternVLExpert:
    options = {"preset": "internvl-tiny", "processor_name_or_path": str(processor_dir), "max_new_tokens": 4}
    options.update(kwargs)
    return InternVLExpert(**options)


def make_trainer(tmp_path, max_steps: int, **kwargs) -> Trainer:
    options = {
        "max_steps": max_steps,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "default_root_dir": tmp_path,
    }
    options.update(kwargs)
    return Trainer(**options)


class LossRecorder(Callback):
    """Records the training loss after every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_fixed_batch_loss_halves(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    seed_everything(0)
    expert = make_expert(tiny_internvl_processor_dir, learning_rate=3e-3, warmup_ratio=0.0)
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, max_steps=20, callbacks=[recorder])
    trainer.fit(expert, loader(tiny_internvl_batch))
    assert len(recorder.losses) == 20
    assert recorder.losses[-1] <= 0.5 * recorder.losses[0]
    assert set(trainer.callback_metrics) >= {"train/loss", "train/lr", "train/grad_norm"}


def test_validation_scores_and_writes_predictions(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    seed_everything(0)
    predictions_dir = tmp_path / "predictions"
    expert = make_expert(
        tiny_internvl_processor_dir,
        learning_rate=3e-3,
        warmup_ratio=0.0,
        expert_id=1,
        predictions_dir=str(predictions_dir),
    )
    trainer = make_trainer(tmp_path, max_steps=30)
    trainer.fit(expert, loader(tiny_internvl_batch))
    (metrics,) = trainer.validate(expert, loader(tiny_internvl_batch))

    answers = expert.generate_answers(tiny_internvl_batch)
    assert answers == [answers[0] for answers in tiny_internvl_batch["gt_answers"]]
    assert metrics["val/easyvqa/exact_match"] == 1.0
    assert metrics["val/loss"] < 1.0

    (path,) = predictions_dir.glob("val-expert1-step*.jsonl")
    assert path.name == "val-expert1-step0000030.jsonl"
    records = read_predictions(path)
    assert len(records) == 8
    assert {record["expert"] for record in records} == {1}
    assert [record["answer"] for record in records] == answers
    assert records[0]["gt_answers"] == ["red"]


def test_untrained_model_answers_are_strings(tiny_internvl_processor_dir, tiny_internvl_batch):
    expert = make_expert(tiny_internvl_processor_dir, max_new_tokens=3)
    expert.configure_model()
    answers = expert.generate_answers(tiny_internvl_batch)
    assert len(answers) == 8
    assert all(isinstance(answer, str) for answer in answers)
    tokenizer = expert.load_processor().tokenizer
    assert all(len(tokenizer(answer)["input_ids"]) <= 3 for answer in answers)


def test_train_parts_freeze_the_rest(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    seed_everything(0)
    expert = make_expert(tiny_internvl_processor_dir, train_parts=("projector",), learning_rate=1e-2)
    expert.configure_model()
    before = {name: p.detach().clone() for name, p in expert.model.named_parameters()}
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(expert, loader(tiny_internvl_batch))
    for name, parameter in expert.model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == name.startswith("model.multi_modal_projector."), name


def test_warmup_cosine_schedule(tiny_internvl_processor_dir):
    expert = make_expert(tiny_internvl_processor_dir, learning_rate=4e-5, warmup_ratio=0.03, weight_decay=0.05)
    expert.configure_model()
    fake_trainer = SimpleNamespace(estimated_stepping_batches=100)
    with mock.patch.object(InternVLExpert, "trainer", new_callable=mock.PropertyMock, return_value=fake_trainer):
        config = expert.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = math.ceil(0.03 * 100)
    assert lrs[0] == 0.0
    assert lrs[warmup] == pytest.approx(4e-5)
    assert max(lrs) == pytest.approx(4e-5)
    assert lrs[warmup + 1] < lrs[warmup]
    assert lrs[-1] < 1e-7
    decays = {group["weight_decay"]: group["params"] for group in optimizer.param_groups}
    assert all(p.ndim >= 2 for p in decays[0.05])
    assert all(p.ndim == 1 for p in decays[0.0])


def test_resume_continues_step_and_optimizer(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    seed_everything(0)
    checkpoints = tmp_path / "checkpoints"
    first = make_expert(tiny_internvl_processor_dir, learning_rate=1e-3)
    trainer = make_trainer(
        tmp_path,
        max_steps=3,
        enable_checkpointing=True,
        callbacks=[ModelCheckpoint(dirpath=checkpoints, save_last=True, every_n_train_steps=3)],
    )
    trainer.fit(first, loader(tiny_internvl_batch, length=10))
    saved = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 3

    class StartProbe(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            self.start_step = trainer.global_step
            self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
            self.scheduler_epoch = trainer.lr_scheduler_configs[0].scheduler.last_epoch

    probe = StartProbe()
    resumed = make_expert(tiny_internvl_processor_dir, learning_rate=1e-3)
    trainer = make_trainer(tmp_path, max_steps=5, enable_checkpointing=True, callbacks=[probe])
    trainer.fit(resumed, loader(tiny_internvl_batch, length=10), ckpt_path=checkpoints / "last.ckpt")
    assert probe.start_step == 3
    assert probe.scheduler_epoch == 3
    saved_state = saved["optimizer_states"][0]["state"]
    resumed_state = probe.optimizer_state["state"]
    assert set(resumed_state) == set(saved_state)
    for index, state in saved_state.items():
        torch.testing.assert_close(resumed_state[index]["exp_avg"], state["exp_avg"])
        torch.testing.assert_close(resumed_state[index]["exp_avg_sq"], state["exp_avg_sq"])
    assert trainer.global_step == 5


def test_option_errors_are_reported_together():
    with pytest.raises(ValueError) as error:
        InternVLExpert(preset="internvl-huge", train_parts=("vision", "decoder"), warmup_ratio=1.5)
    message = str(error.value)
    assert "unknown preset 'internvl-huge'" in message
    assert "internvl2_5-1b" in message
    assert "processor_name_or_path" in message
    assert "train_parts ['vision', 'decoder']" in message
    assert "warmup_ratio 1.5" in message


def test_missing_checkpoint_path(tmp_path):
    expert = InternVLExpert(model_name_or_path=str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
        expert.configure_model()


def test_other_architecture_is_rejected(tiny_internvl_processor_dir, tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen2")
    expert = InternVLExpert(
        model_name_or_path=str(tmp_path / "qwen2"), processor_name_or_path=str(tiny_internvl_processor_dir)
    )
    with pytest.raises(ValueError, match="model_type 'qwen2', not 'internvl'"):
        expert.configure_model()


def test_image_token_mismatch_is_rejected(tiny_internvl_processor_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_internvl_processor_dir)
    processor.image_seq_length = 64
    processor.save_pretrained(tmp_path / "processor")
    expert = make_expert(tmp_path / "processor")
    with pytest.raises(ValueError, match="image_seq_length=64 does not match the model's 16"):
        expert.configure_model()


def test_batch_image_token_mismatch_is_rejected(tiny_internvl_processor_dir, tiny_internvl_batch):
    expert = make_expert(tiny_internvl_processor_dir)
    expert.configure_model()
    batch = dict(tiny_internvl_batch)
    batch["pixel_values"] = batch["pixel_values"][:4]  # 8 prompts with images, 4 tiles
    with pytest.raises(ValueError, match="128 image tokens .* for 4 image tiles"):
        expert.training_step(batch, 0)


def test_preset_config_matches_processor(tiny_internvl_processor_dir):
    expert = make_expert(tiny_internvl_processor_dir)
    expert.configure_model()
    tokenizer = expert.load_processor().tokenizer
    expected = build_model_config("internvl-tiny", tokenizer)
    assert expert.model.config.image_token_id == expected.image_token_id
    assert expert.model.config.text_config.vocab_size == len(tokenizer)
    assert json.loads(json.dumps(expert.hparams["train_parts"])) == ["vision", "projector", "llm"]


def test_predict_writes_predictions(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path):
    expert = make_expert(tiny_internvl_processor_dir, max_new_tokens=2, predictions_dir=str(tmp_path))
    trainer = make_trainer(tmp_path, max_steps=1)
    (records,) = trainer.predict(expert, loader(tiny_internvl_batch))
    assert [record["question_id"] for record in records] == [f"q{i}" for i in range(8)]
    written = read_predictions(tmp_path / "predict-expert0-step0000000.jsonl")
    assert [record["answer"] for record in written] == [record["answer"] for record in records]


def test_native_checkpoint_loads_by_path(tiny_internvl_processor_dir, tmp_path):
    source = make_expert(tiny_internvl_processor_dir)
    source.configure_model()
    source.model.save_pretrained(tmp_path / "native")
    source.load_processor().save_pretrained(tmp_path / "native")

    expert = InternVLExpert(model_name_or_path=str(tmp_path / "native"), gradient_checkpointing=True)
    expert.configure_model()
    assert expert.model.is_gradient_checkpointing
    expected = source.model.state_dict()
    for name, tensor in expert.model.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], msg=name)
