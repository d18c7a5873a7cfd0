"""Chat templates: dsjax renders DeepSeek-V3's (and other) templates exactly as transformers'
apply_chat_template does, and SFT trains on the assistant turns' tokens and nothing else."""

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer

from dsjax.tokenizer import HFTokenizer, render_chat
from train.stages.sft import SFTConfig, chat_pieces, pack, read_examples, window_batch

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
TOOL_TOKENS = ["<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
               "<｜tool▁sep｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>", "<｜tool▁output▁begin｜>",
               "<｜tool▁output▁end｜>"]

# DeepSeek-V3's chat_template (tokenizer_config.json of deepseek-ai/DeepSeek-V3), one line.
DEEPSEEK_V3 = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}"
    "{%- else %}{% set ns.system_prompt = ns.system_prompt + '\\n\\n' + message['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}{{ bos_token }}{{ ns.system_prompt }}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}"
    "{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' in message %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls'] %}{%- if not ns.is_first %}{%- if message['content'] is none %}"
    "{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}"
    "{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + "
    "tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- endif %}"
    "{%- set ns.is_first = true -%}{%- else %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + "
    "tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + "
    "'<｜tool▁call▁end｜>'}}{%- endif %}{%- endfor %}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and 'tool_calls' not in message %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}"
    "{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    "{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'<｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}"
    "{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)

CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"},
     {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Say ünïcödé, 日本語 and 🎉\nplease."},
     {"role": "assistant", "content": "ünïcödé, 日本語 and 🎉\n"}],
    [{"role": "system", "content": "First rule."}, {"role": "system", "content": "Second rule."},
     {"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny.", "name": None}],
    [{"role": "user", "content": "  spaces  around  "}, {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "and now?"}],
]


def _tokenizer_dir(path, template=DEEPSEEK_V3):
    """A DeepSeek-style tokenizer folder: a byte-level BPE trained here on a few lines, the
    special tokens DeepSeek-V3 uses, and `template` in tokenizer_config.json."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [m["content"] for c in CONVERSATIONS for m in c] * 4 + ["the weather is sunny in Paris today"] * 4
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, USER, ASSISTANT] + TOOL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "clean_up_tokenization_spaces": False}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return str(path)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    return _tokenizer_dir(tmp_path_factory.mktemp("tok") / "deepseek")


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_rendering_equals_transformers(deepseek_dir, index, generation_prompt):
    ours, theirs = HFTokenizer(deepseek_dir), AutoTokenizer.from_pretrained(deepseek_dir)
    chat = CONVERSATIONS[index]
    want = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.apply_chat_template(chat, add_generation_prompt=generation_prompt) == want
    assert want.startswith(BOS) and (want.endswith(ASSISTANT) or not generation_prompt)
    ids = theirs.apply_chat_template(chat, tokenize=True, add_generation_prompt=generation_prompt)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ours.encode(want).tolist() == list(ids)


def test_globals_filters_and_errors_match_transformers(tmp_path):
    template = ("{% for m in messages %}{% if m.role not in ['user', 'assistant'] %}"
                "{{ raise_exception('Unknown role: ' + m.role) }}{% endif %}"
                "{% generation %}{{ m | tojson }}{% endgeneration %}{% if loop.index == 2 %}{% break %}{% endif %}"
                "{% endfor %}{{ strftime_now('%Y') }}{{ eos_token }}{{ tools is none }}")
    folder = _tokenizer_dir(tmp_path / "custom", template)
    ours, theirs = HFTokenizer(folder), AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "<b>ü & 'x'</b>", "name": None}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": "after the break"}]
    got = ours.apply_chat_template(chat)
    assert got == theirs.apply_chat_template(chat, tokenize=False)
    assert '"<b>ü & \'x\'</b>"' in got and "name" not in got and "after the break" not in got
    with pytest.raises(ValueError, match="^the chat template refused the conversation: Unknown role: tool$"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match=r"^the chat template is not valid Jinja \(line 1: "):
        render_chat("{% for m in messages %}", CONVERSATIONS[0])
    plain = HFTokenizer(_tokenizer_dir(tmp_path / "plain", None))
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="has no chat template"):
        plain.apply_chat_template(CONVERSATIONS[0])


def test_chat_template_jinja_file_is_read(tmp_path, deepseek_dir):
    folder = _tokenizer_dir(tmp_path / "jinja", None)
    (tmp_path / "jinja" / "chat_template.jinja").write_text(DEEPSEEK_V3)
    assert HFTokenizer(folder).chat_template == DEEPSEEK_V3
    assert HFTokenizer(deepseek_dir).special_tokens == {"bos_token": BOS, "eos_token": EOS}


# What DeepSeek-V3's template puts after each assistant turn's generation prompt.
REPLIES = [
    ["5" + EOS],
    ["Hello! How can I help?" + EOS, "ünïcödé, 日本語 and 🎉\n" + EOS],
    ["<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>weather\n```json\n"
     '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' + EOS, "It is sunny." + EOS],
]


def test_sft_trains_every_assistant_turn_and_nothing_else(tmp_path, deepseek_dir):
    ours, theirs = HFTokenizer(deepseek_dir), AutoTokenizer.from_pretrained(deepseek_dir)
    chats = [c for c in CONVERSATIONS if c[-1]["role"] == "assistant"]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    examples, skipped = read_examples([str(path)], SFTConfig(), ours)
    assert skipped == 0 and len(examples) == len(chats) == len(REPLIES)
    assert examples[0].prompt == f"{BOS}Be brief.{USER}What is 2+3?{ASSISTANT}" and examples[0].response == f"5{EOS}"
    packed = pack(examples, ours, seq_len=256)
    assert len(packed) == 1
    at, trained_targets = 0, []
    for chat, replies in zip(chats, REPLIES):
        want = theirs.apply_chat_template(chat, tokenize=True)
        want = list(want["input_ids"] if hasattr(want, "keys") else want)
        tokens, trained = packed.tokens[0, at:at + len(want)], packed.loss[0, at:at + len(want)]
        assert tokens.tolist() == want  # the pieces tokenize as transformers tokenizes the whole
        # The trained runs are the assistant turns (content and end-of-sentence), in order.
        edges = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(int), [0]])))
        runs = [tokens[a:b].tolist() for a, b in zip(edges[::2], edges[1::2])]
        assert runs == [ours.encode(r).tolist() for r in replies]
        trained_targets += [t for r in runs for t in r]
        at += len(want)
    # Through the model's inputs: the targets in the loss mask are exactly the replies' tokens.
    b = window_batch(packed.tokens, packed.segments, packed.loss)
    assert b["targets"][0][b["mask"][0]].tolist() == trained_targets


def test_refuses_a_template_whose_generation_prompt_is_not_the_turns_start(tmp_path):
    r1_like = DEEPSEEK_V3.replace("{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}")
    tok = HFTokenizer(_tokenizer_dir(tmp_path / "r1", r1_like))
    with pytest.raises(ValueError, match="generation prompt is not how it starts message 1"):
        chat_pieces(tok, CONVERSATIONS[1])
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": CONVERSATIONS[1]}) + "\n")
    with pytest.raises(ValueError, match=r"chat.jsonl:1: the chat template's generation prompt"):
        read_examples([str(path)], SFTConfig(), tok)
