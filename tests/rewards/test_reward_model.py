from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from rewards import RewardConfigError, build_rewards
from rewards.reward_model import load_reward_model, pair_text, reward_model_reward

WORDS = ["<pad>", "<unk>", "<s>", "</s>", "user", "assistant", ":", "what", "is", "two", "plus", "four", "yes", "no"]
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"


def _save_tiny(path, chat_template=None):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        num_labels=1,
        pad_token_id=0,
    )
    transformers.LlamaForSequenceClassification(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("rm_plain"))


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return _save_tiny(tmp_path_factory.mktemp("rm_chat"), TEMPLATE)


PROMPTS = ["what is two plus two", "what is four", "what is two", "is four two"]
COMPLETIONS = [" four", " yes yes no four two", " no", " two plus two is four"]


def test_scores_are_batch_invariant_and_deterministic(plain_model):
    one = reward_model_reward(PROMPTS, COMPLETIONS, model=plain_model, batch_size=1, device="cpu")
    four = reward_model_reward(PROMPTS, COMPLETIONS, model=plain_model, batch_size=4, device="cpu")
    assert len(one) == 4 and all(isinstance(x, float) for x in one)
    assert four == pytest.approx(one, abs=1e-5)
    assert len(set(round(x, 6) for x in one)) > 1


def test_model_loads_once_per_process(plain_model):
    reward_model_reward(PROMPTS[:1], COMPLETIONS[:1], model=plain_model, device="cpu")
    hits = load_reward_model.cache_info().hits
    reward_model_reward(PROMPTS[:1], COMPLETIONS[:1], model=plain_model, device="cpu")
    assert load_reward_model.cache_info().hits == hits + 1


def test_chat_template_is_applied(chat_model):
    _, tokenizer = load_reward_model(chat_model, "cpu")
    conversation = [{"role": "user", "content": "what is two"}]
    assert pair_text(tokenizer, conversation, [{"role": "assistant", "content": "four"}]) == (
        "user : what is two assistant : four "
    )
    assert pair_text(tokenizer, "what is two", "four") == "user : what is two assistant : four "
    [reward] = build_rewards([{"name": "reward_model", "params": {"model": chat_model, "device": "cpu"}}])
    conversational = reward([conversation], [[{"role": "assistant", "content": "four"}]])
    plain = reward(["what is two"], ["four"])
    assert conversational == pytest.approx(plain)


def test_missing_model_dir_fails_at_build_time(tmp_path):
    with pytest.raises(RewardConfigError, match="not a local model directory"):
        build_rewards([{"name": "reward_model", "params": {"model": str(tmp_path / "nope")}}])
    with pytest.raises(RewardConfigError, match="missing required param.*model"):
        build_rewards(["reward_model"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_by_default_matches_cpu(plain_model):
    cpu = reward_model_reward(PROMPTS, COMPLETIONS, model=plain_model, device="cpu")
    auto = reward_model_reward(PROMPTS, COMPLETIONS, model=plain_model, batch_size=3)
    fp32 = reward_model_reward(PROMPTS, COMPLETIONS, model=plain_model, device="cuda", dtype="float32")
    net, _ = load_reward_model(str(Path(plain_model).resolve()), "cuda", "auto")
    assert net.device.type == "cuda" and net.dtype == torch.bfloat16
    assert fp32 == pytest.approx(cpu, abs=1e-4)
    assert auto == pytest.approx(cpu, abs=5e-2)


@pytest.fixture(scope="module")
def align_model(tmp_path_factory):
    """A tiny `align rm`-style checkpoint: align's sequence-classification class + the tiny tokenizer."""
    from align.models import DeepseekV2ForSequenceClassification
    from align.models.presets import preset_config
    from data_tools.tokenizer import load_tokenizer, padding_id

    path = tmp_path_factory.mktemp("align_rm")
    tokenizer = load_tokenizer("tiny")
    config = preset_config("tiny", num_hidden_layers=2)
    config.num_labels, config.pad_token_id = 1, padding_id(tokenizer)
    torch.manual_seed(0)
    model = DeepseekV2ForSequenceClassification(config)
    model.reset_parameters(0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_align_checkpoint_runs_on_align_class_with_transformers_scores(align_model):
    from align.models import DeepseekV2ForSequenceClassification

    net, tokenizer = load_reward_model(align_model, "cpu", "auto", "auto")
    assert isinstance(net, DeepseekV2ForSequenceClassification)
    prompts = [[{"role": "user", "content": f"What is {a} + 7?"}] for a in (3, 14, 250)]
    completions = [[{"role": "assistant", "content": f" {a + 7}"}] for a in (3, 14, 260)]
    ours = reward_model_reward(prompts, completions, model=align_model, device="cpu", batch_size=2)
    theirs = reward_model_reward(prompts, completions, model=align_model, device="cpu", model_class="transformers")
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-5)
    assert len(set(ours)) == 3


def test_reply_whitespace_is_rendered_once(align_model):
    _, tokenizer = load_reward_model(align_model, "cpu", "auto", "auto")
    prompt = [{"role": "user", "content": "What is 2 + 2?"}]
    # the engine's completion text carries the space after "Assistant:"; SFT / RM data do not
    assert pair_text(tokenizer, prompt, [{"role": "assistant", "content": " 4"}]) == (
        tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": "4"}], tokenize=False))
    assert pair_text(tokenizer, prompt, [{"role": "assistant", "content": "4"}]).endswith("Assistant: 4" +
                                                                                          tokenizer.eos_token)


def test_bad_model_class_fails_at_build_time(align_model):
    with pytest.raises(RewardConfigError, match="model_class"):
        build_rewards([{"name": "reward_model", "params": {"model": align_model, "model_class": "Nope"}}])
