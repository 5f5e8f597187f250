"""Export of a trained expert to a transformers directory that reloads and decodes the same tokens."""

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightning_modules.export import export_expert, load_trained_expert
from lightning_modules.internvl_module import InternVLExpert

torch.set_num_threads(1)


def greedy_tokens(model, batch, max_new_tokens: int) -> torch.Tensor:
    return model.generate(
        input_ids=batch["prompt_input_ids"],
        attention_mask=batch["prompt_attention_mask"],
        pixel_values=batch["pixel_values"],
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )[:, batch["prompt_input_ids"].shape[1] :]


@pytest.fixture(scope="module")
def trained_checkpoint(tiny_internvl_processor_dir, tiny_internvl_batch, tmp_path_factory):
    seed_everything(0)
    expert = InternVLExpert(
        preset="internvl-tiny",
        processor_name_or_path=str(tiny_internvl_processor_dir),
        learning_rate=3e-3,
        warmup_ratio=0.0,
        max_new_tokens=4,
        gradient_checkpointing=True,
    )
    trainer = Trainer(
        max_steps=30,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path_factory.mktemp("train"),
    )
    batches = DataLoader([tiny_internvl_batch] * 30, batch_size=None)
    trainer.fit(expert, batches)
    path = tmp_path_factory.mktemp("checkpoint") / "expert.ckpt"
    trainer.save_checkpoint(path)
    expert.eval()
    return expert, path


def test_export_reloads_and_decodes_same_tokens(trained_checkpoint, tiny_internvl_batch, tmp_path):
    expert, checkpoint = trained_checkpoint
    output_dir = export_expert(checkpoint, tmp_path / "export")

    model = AutoModelForImageTextToText.from_pretrained(output_dir).eval()
    processor = AutoProcessor.from_pretrained(output_dir)
    assert type(model).__name__ == "InternVLForConditionalGeneration"
    assert processor.image_seq_length == 16

    with torch.no_grad():
        expected = greedy_tokens(expert.model, tiny_internvl_batch, max_new_tokens=4)
        actual = greedy_tokens(model, tiny_internvl_batch, max_new_tokens=4)
    assert torch.equal(actual, expected)
    decoded = [text.strip() for text in processor.tokenizer.batch_decode(actual, skip_special_tokens=True)]
    assert decoded == expert.generate_answers(tiny_internvl_batch)
    # 30 steps on the fixed batch are enough to fit it, so the compared tokens are not noise.
    assert decoded == [answers[0] for answers in tiny_internvl_batch["gt_answers"]]


def test_trained_weights_are_loaded(trained_checkpoint):
    expert, checkpoint = trained_checkpoint
    reloaded = load_trained_expert(checkpoint)
    assert not reloaded.hparams.gradient_checkpointing
    for (name, expected), (_, actual) in zip(
        expert.model.state_dict().items(), reloaded.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(actual, expected, msg=name)


def test_bfloat16_export(trained_checkpoint, tmp_path):
    _, checkpoint = trained_checkpoint
    output_dir = export_expert(checkpoint, tmp_path / "bf16", dtype="bfloat16")
    model = AutoModelForImageTextToText.from_pretrained(output_dir, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_missing_checkpoint_is_rejected(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt does not exist"):
        export_expert(tmp_path / "nothing.ckpt", tmp_path / "out")


def test_foreign_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"hidden": 3}}, path)
    with pytest.raises(ValueError, match="no InternVLExpert hyperparameters"):
        export_expert(path, tmp_path / "out")
