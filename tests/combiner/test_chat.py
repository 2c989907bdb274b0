"""Chat: `messages` rendered with a role's chat template, and the end-of-turn stop.

Over a real mesh of the shipped demo family (its tuned models carry the family's chat template;
its base models carry none): a chat gives exactly what the same conversation sent as the
hand-formatted prompt gives, stops at the end of the assistant's turn with no end-of-turn text,
and the refusals name what to fix. Unit tests: end-of-turn detection for ChatML and Llama-3
style templates (a tokenizer with those special tokens added).
"""

from __future__ import annotations

import argparse
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from conftest import start_combiner, start_logit
from eftmesh import cli
from eftmesh.cli import add_request_flags
from eftmesh.combiner.convert import Defaults
from eftmesh.combiner.server import DEFAULT_COMPOSITION
from eftmesh.core.sampling import SamplingConfig
from eftmesh.combiner.chat import ChatMessage, end_of_turn_ids, render
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

MODELS = Path(__file__).resolve().parents[2] / "models" / "demo"
ROLES = ("base-large", "base-small", "ft-small")
QUESTION = "Where does Kavo Thelmir live?"
UPSCALE = generator_pb2.Composition(
    base="base-large", deltas=[generator_pb2.Delta(tuned="ft-small", reference="base-small", weight=1.0)]
)
GREEDY = {"temperature": 0.0}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def demo_mesh():
    logits = {r: start_logit(MODELS / r, r) for r in ROLES}
    cs = start_combiner(MODELS / "ft-small", {r: ls.server.port for r, ls in logits.items()},
                        defaults=Defaults(DEFAULT_COMPOSITION, SamplingConfig(temperature=1.0, top_p=1.0), 16, 1024))
    channel = grpc.insecure_channel(f"127.0.0.1:{cs.server.port}")
    stub = generator_pb2_grpc.GeneratorStub(channel)
    stub.address = f"127.0.0.1:{cs.server.port}"
    yield stub
    channel.close()
    cs.stop(0)
    for ls in logits.values():
        ls.server.stop(0).wait()


def _complete(stub, **fields) -> generator_pb2.CompleteResponse:
    fields.setdefault("composition", UPSCALE)
    return stub.Complete(generator_pb2.CompleteRequest(sampling=GREEDY, max_new_tokens=12, **fields), timeout=120)


@pytest.mark.e2e
def test_a_chat_equals_its_hand_formatted_prompt_and_stops_at_the_end_of_turn(demo_mesh) -> None:
    prompt = "<|endoftext|>User: " + QUESTION + "\nAssistant:"  # the family's format, by hand
    by_hand = _complete(demo_mesh, prompt=prompt)
    chat = _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}])
    assert list(chat.token_ids) == list(by_hand.token_ids) and chat.text == by_hand.text
    assert chat.finish_reason == generator_pb2.FINISH_REASON_EOS  # the turn ended, within 12 tokens
    assert chat.token_ids[-1] == 0 and "<|endoftext|>" not in chat.text and chat.text.strip()
    # the prompt the combiner tokenised is the hand-formatted one: BOS written once, by the template
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ft-small"))
    assert chat.usage.prompt_tokens == len(tok.encode(prompt, add_special_tokens=False))
    # streaming gives the same
    chunks = list(demo_mesh.Generate(generator_pb2.GenerateRequest(
        messages=[{"role": "user", "content": QUESTION}], composition=UPSCALE, sampling=GREEDY, max_new_tokens=12)))
    assert [t for c in chunks for t in c.token_ids] == list(chat.token_ids)
    assert "".join(c.text for c in chunks) == chat.text


@pytest.mark.e2e
def test_a_multi_turn_chat_renders_the_history(demo_mesh) -> None:
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "Brackwell"},
               {"role": "user", "content": "What does Kavo Thelmir do?"}]
    prompt = ("<|endoftext|>User: " + QUESTION + "\nAssistant: Brackwell<|endoftext|>"
              "User: What does Kavo Thelmir do?\nAssistant:")
    assert list(_complete(demo_mesh, messages=history).token_ids) == list(_complete(demo_mesh, prompt=prompt).token_ids)


@pytest.mark.e2e
def test_info_lists_the_roles_that_can_render_a_chat(demo_mesh) -> None:
    info = demo_mesh.Info(generator_pb2.GeneratorInfoRequest(), timeout=10)
    assert list(info.chat_roles) == ["ft-small"]


@pytest.mark.e2e
@pytest.mark.parametrize("fields,code,fragments", [
    (dict(prompt="Hi", messages=[{"role": "user", "content": "Hi"}]), grpc.StatusCode.INVALID_ARGUMENT,
     ["both prompt and messages"]),
    (dict(messages=[{"role": "user", "content": QUESTION}], chat_template_role="base-large"),
     grpc.StatusCode.FAILED_PRECONDITION, ["'base-large' has no chat template", "ft-small", "--chat-template"]),
    (dict(messages=[{"role": "user", "content": QUESTION}], chat_template_role="nope"), grpc.StatusCode.NOT_FOUND,
     ["nope"]),
    (dict(messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]),
     grpc.StatusCode.INVALID_ARGUMENT, ["chat template refused", "user and assistant turns only"]),
    (dict(messages=[{"role": "", "content": QUESTION}]), grpc.StatusCode.INVALID_ARGUMENT, ["role is empty"]),
    (dict(messages=[{"role": "user", "content": "x"}] * 1025), grpc.StatusCode.INVALID_ARGUMENT, ["1024"]),
    (dict(messages=[{"role": "user", "content": "word " * 20000}]), grpc.StatusCode.INVALID_ARGUMENT,
     ["the conversation, rendered with its chat template, is", "shorten the conversation"]),
    # the composition's only role has no template: plain decoding of a base model cannot chat
    (dict(messages=[{"role": "user", "content": QUESTION}], composition=generator_pb2.Composition(base="base-large")),
     grpc.StatusCode.FAILED_PRECONDITION, ["no chat template"]),
], ids=["both", "role without template", "unknown role", "template refuses", "empty role", "too many turns",
        "too long", "base only"])
def test_bad_chats_get_their_status_and_say_what_to_fix(demo_mesh, fields, code, fragments) -> None:
    with pytest.raises(grpc.RpcError) as e:
        _complete(demo_mesh, **fields)
    assert e.value.code() == code, e.value.details()
    for fragment in fragments:
        assert fragment in e.value.details()
    assert _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).text  # still serving


@pytest.mark.parametrize("template,token", [(CHATML, "<|im_end|>"), (LLAMA3, "<|eot_id|>")], ids=["chatml", "llama3"])
def test_end_of_turn_is_the_special_token_after_the_assistants_text(template, token) -> None:
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ft-small"))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|start_header_id|>",
                                                          "<|end_header_id|>", "<|eot_id|>"]})
    assert end_of_turn_ids(tok, template) == {tok.convert_tokens_to_ids(token), tok.eos_token_id}
    text = render(tok, template, [ChatMessage("user", "Hi")])
    assert text.endswith("assistant\n") or text.endswith("<|end_header_id|>\n\n")


def test_a_template_that_cannot_render_the_probe_leaves_eos_alone() -> None:
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ft-small"))
    picky = "{{ raise_exception('no') }}"
    assert end_of_turn_ids(tok, picky) == {tok.eos_token_id}


# ---- eftmesh chat: the interactive terminal client ----

def _chat_args(address: str, *flags: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_request_flags(p)
    a = p.parse_args(["--temperature", "0", "--max-new-tokens", "12", "--base", "base-large",
                      "--delta", "ft-small,base-small,1.0", *flags])
    a.address, a.system, a.chat_template_role, a.timeout, a.verbose, a.tls, a.metadata = address, "", "", 60.0, False, None, None
    return a


def _script(*lines: str):
    it = iter(lines)

    def read(prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None
    return read


@pytest.mark.e2e
def test_eftmesh_chat_streams_each_answer_and_keeps_the_history(demo_mesh) -> None:
    q2 = "What does Kavo Thelmir do?"
    out = io.StringIO()
    assert cli.chat(_chat_args(demo_mesh.address), read=_script(QUESTION, "", q2), out=out) == 0
    a1 = _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).text
    a2 = _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}, {"role": "assistant", "content": a1},
                                        {"role": "user", "content": q2}]).text
    assert out.getvalue() == a1 + "\n" + a2 + "\n\n"  # the second answer saw the first turn
    out = io.StringIO()  # /reset forgets: the same question twice gives the first answer twice
    assert cli.chat(_chat_args(demo_mesh.address), read=_script(QUESTION, "/reset", QUESTION, "/exit"), out=out) == 0
    assert out.getvalue() == a1 + "\n" + a1 + "\n"


@pytest.mark.e2e
def test_eftmesh_chat_ctrl_c_stops_the_answer_not_the_program(demo_mesh) -> None:
    class InterruptOnce(io.StringIO):
        interrupted = False

        def write(self, text: str) -> int:
            if text and not self.interrupted and not text.startswith(" ["):
                self.interrupted = True
                super().write(text)
                raise KeyboardInterrupt  # as if Ctrl-C arrived while the answer streamed
            return super().write(text)

    out = InterruptOnce()
    args = _chat_args(demo_mesh.address, "--ignore-eos", "--max-new-tokens", "200")
    assert cli.chat(args, read=_script(QUESTION, QUESTION), out=out) == 0
    first, second = out.getvalue().split("\n")[:2]
    assert first.endswith(" [stopped]")
    assert second and "[stopped]" not in second  # the next turn ran to its end


@pytest.mark.e2e
def test_eftmesh_chat_survives_a_real_sigint(demo_mesh) -> None:
    """A real process and a real SIGINT while an answer streams: the answer stops, the program
    reads the next line and exits 0 on /exit."""
    # `eftmesh chat` with SIGINT handled as at a terminal: a test run started in the background
    # (`nohup ... &`) has SIGINT ignored, which its children inherit. Not with preexec_fn: Python
    # code between fork and exec in this multi-threaded (gRPC) process can abort the child.
    entry = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
             "from eftmesh.cli import main; sys.exit(main())")
    proc = subprocess.Popen([sys.executable, "-c", entry, "chat", "--address", demo_mesh.address, "--temperature", "0",
                             "--ignore-eos", "--max-new-tokens", "230", "--base", "base-large",
                             "--delta", "ft-small,base-small,1.0"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=0)
    try:
        proc.stdin.write(QUESTION + "\n")
        proc.stdin.flush()
        seen = ""
        while len(seen) < len("you> ") + 8:  # the prompt, then the answer streaming
            c = proc.stdout.read(1)
            if not c:  # it closed its output: it exited (or crashed) before answering
                proc.wait(10)
                pytest.fail(f"eftmesh chat exited with {proc.returncode} before answering; saw {seen!r}, "
                            f"stderr: {proc.stderr.read()[-2000:]}")
            seen += c
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.stdin.write("/exit\n")
        proc.stdin.flush()
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "[stopped]" in seen + rest and "Traceback" not in err


@pytest.mark.e2e
def test_eftmesh_up_shows_a_demo_question_as_a_chat(demo_mesh, capsys) -> None:
    from eftmesh.launcher import stream_demo

    stream_demo(demo_mesh.address, None, 12, 0.0, question=QUESTION, gold="Brackwell")
    out = capsys.readouterr().out
    answer = _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).text
    assert f"user: {QUESTION}\nassistant:{answer}\n---" in out and "finish: eos" in out
    assert "ft-small alone:" in out and "base-large alone:" in out  # contrasts, with ft-small's template


@pytest.mark.e2e
def test_eftmesh_chat_reports_a_failed_turn_forgets_it_and_goes_on(demo_mesh, capsys) -> None:
    """A turn the combiner refuses prints the status and its message and is not kept (the next
    answer is the one a fresh conversation gets); Ctrl-C at the prompt only clears the line."""
    calls = iter(["word " * 20000, KeyboardInterrupt, QUESTION])

    def read(prompt: str) -> str:
        try:
            item = next(calls)
        except StopIteration:
            raise EOFError from None
        if item is KeyboardInterrupt:
            raise KeyboardInterrupt
        return item

    out = io.StringIO()
    assert cli.chat(_chat_args(demo_mesh.address), read=read, out=out) == 0
    assert "error: INVALID_ARGUMENT: the conversation, rendered with its chat template, is" in capsys.readouterr().err
    fresh = _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).text
    assert out.getvalue() == "\n" + "\n" + fresh + "\n" + "\n"  # failed turn, cleared prompt, the answer, EOF


@pytest.mark.e2e
def test_eftmesh_chat_names_a_role_without_a_template(demo_mesh, capsys) -> None:
    args = _chat_args(demo_mesh.address)
    args.chat_template_role = "base-large"
    assert cli.chat(args, read=_script(QUESTION), out=io.StringIO()) == 0
    assert "error: FAILED_PRECONDITION: role 'base-large' has no chat template" in capsys.readouterr().err


@pytest.mark.e2e
def test_grpcurl_sends_a_chat_as_the_docs_show(demo_mesh) -> None:
    """docs/api.md's grpcurl chat call, with the real grpcurl binary and reflection only."""
    from test_grpcurl import call

    got = call(demo_mesh.address, "eftmesh.v1.Generator/Complete",
               {"messages": [{"role": "user", "content": QUESTION}], "max_new_tokens": 12, "sampling": {"temperature": 0},
                "composition": {"base": "base-large", "deltas": [{"tuned": "ft-small", "reference": "base-small",
                                                                  "weight": 1.0}]}})
    assert got["text"] == _complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).text
    assert got["finish_reason"] == "FINISH_REASON_EOS"


def test_message_content_is_data_never_template_code() -> None:
    tok = AutoTokenizer.from_pretrained(str(MODELS / "ft-small"))
    text = render(tok, tok.chat_template, [ChatMessage("user", "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}")])
    assert "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %}" in text and "49" not in text


@pytest.mark.e2e
@pytest.mark.slow
def test_fuzzed_chats_never_get_internal_and_leave_the_mesh_serving(demo_mesh) -> None:
    """Generated conversations (odd roles and contents, template syntax in them, unknown template
    roles, prompt and messages together): every answer is OK or a caller-error status, and a
    reference chat is unchanged afterwards."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    reference = list(_complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).token_ids)
    text = st.one_of(st.text(max_size=40), st.sampled_from(["{{ 7 * 7 }}", "{% raise %}", "<|endoftext|>", "\x00", ""]))
    # mostly roles the demo template takes, so most cases reach generation; the rest probe refusals
    role = st.one_of(st.just("user"), st.just("assistant"), st.just("user"), st.sampled_from(["system", ""]), text)
    message = st.fixed_dictionaries({"role": role, "content": text})
    request = st.fixed_dictionaries({
        "messages": st.lists(message, min_size=1, max_size=6),
        "chat_template_role": st.sampled_from(["", "", "ft-small", "base-large", "nope", "x" * 200]),
        "prompt": st.sampled_from(["", "", "", "Hi"]),
        "max_new_tokens": st.integers(1, 4),
    })
    bad = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request)
    def run(fields) -> None:
        try:
            demo_mesh.Complete(generator_pb2.CompleteRequest(composition=UPSCALE, sampling=GREEDY, **fields), timeout=60)
        except grpc.RpcError as e:
            assert e.code() not in bad, (e.code(), e.details(), fields)

    run()
    assert list(_complete(demo_mesh, messages=[{"role": "user", "content": QUESTION}]).token_ids) == reference


@pytest.mark.e2e
def test_a_chats_second_turn_finds_its_history_in_every_roles_prefix_cache(demo_mesh) -> None:
    """No client change: the second turn re-sends the first as messages, the combiner renders
    them with the chat template, and the logit services find the rendered history cached."""
    history = [{"role": "user", "content": "Tell me about the town and the people there. " + QUESTION}]  # new text
    first = _complete(demo_mesh, messages=history)
    assert first.usage.cached_prompt_tokens == 0
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And who lives next door?"}]
    second = _complete(demo_mesh, messages=history)
    assert second.usage.cached_prompt_tokens >= 16, second.usage  # at least the first turn's full blocks
    assert second.usage.cached_prompt_tokens < second.usage.prompt_tokens
