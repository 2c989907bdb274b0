"""The `eftmesh` command: call a combiner, or run the services.

    eftmesh generate "The quick brown fox" --stream          # call a combiner
    eftmesh chat                                             # an interactive chat (messages)
    eftmesh info                                             # what a combiner serves
    eftmesh up                                               # the whole mesh on loopback
    eftmesh logit --model DIR --role base-large --port 50051 # one logit service
    eftmesh combiner --upstream base-large=HOST:PORT ...     # the combiner

The load runner for the ghz scenarios in load_tests/ is the lab's `eftmesh-load` (tools/lab).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc

from eftmesh.common import auth, tls
from eftmesh.v1 import generator_pb2, generator_pb2_grpc

DEFAULT_ADDRESS = "localhost:50050"


def _delta(text: str) -> generator_pb2.Delta:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected TUNED,REFERENCE[,WEIGHT], got {text!r}")
    try:
        weight = float(parts[2]) if len(parts) == 3 else 1.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"weight must be a number, got {parts[2]!r}") from None
    return generator_pb2.Delta(tuned=parts[0], reference=parts[1], weight=weight)


def add_request_flags(p: argparse.ArgumentParser) -> None:
    """One flag per GenerateRequest field (unset flags leave the server's defaults)."""
    p.add_argument("--base", default="", help="base role (default: the combiner's default composition)")
    p.add_argument("--delta", type=_delta, action="append", default=[], metavar="TUNED,REFERENCE[,WEIGHT]", help="a behaviour delta; repeatable (needs --base)")
    p.add_argument("--composition", default="", metavar="NAME", help="a named composition instead of --base/--delta: one of the combiner's --composition names, 'default', or a role alone (eftmesh info lists them)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the server's)")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens; 0 = off (default: the server's)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus mass in (0, 1] (default: the server's)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default: the server's)")
    p.add_argument("--stop", action="append", default=[], help="stop before this string; repeatable")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability under the EFT distribution")
    p.add_argument("--speculation", choices=["off", "fixed", "adaptive"], default=None, help="speculative draft-then-verify mode (default: the server's)")
    p.add_argument("--k", type=int, default=0, help="fixed speculation: tokens drafted per block; 0 = the server's --k")
    p.add_argument("--max-k", type=int, default=0, help="adaptive speculation: the largest k it may choose; 0 = the server's --max-k")
    p.add_argument("--draft-role", default="", help="role that drafts (default: the first delta's tuned role)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating after EOS or the end of turn (fixed-length runs)")


def build_request(a: argparse.Namespace, prompt: str | None = None, messages: list[dict] | None = None) -> dict:
    sampling = {}
    if a.top_k is not None:
        sampling["top_k"] = a.top_k
    if a.temperature is not None:
        sampling["temperature"] = a.temperature
    if a.top_p is not None:
        sampling["top_p"] = a.top_p
    req = dict(
        composition=generator_pb2.Composition(base=a.base, deltas=a.delta, name=getattr(a, "composition", "")),
        sampling=sampling,
        stop=a.stop,
        logprobs=a.logprobs,
    )
    if a.speculation or a.k or a.max_k or a.draft_role:
        mode = {"off": "SPECULATION_MODE_OFF", "fixed": "SPECULATION_MODE_FIXED", "adaptive": "SPECULATION_MODE_ADAPTIVE", None: "SPECULATION_MODE_UNSPECIFIED"}[a.speculation]
        req["speculation"] = generator_pb2.Speculation(mode=mode, k=a.k, max_k=a.max_k, draft_role=a.draft_role)
    if prompt is not None:
        req["prompt"] = prompt
    if messages is not None:
        req["messages"] = messages
        if getattr(a, "chat_template_role", ""):
            req["chat_template_role"] = a.chat_template_role
    if a.ignore_eos:
        req["ignore_eos"] = True
    if a.seed is not None:
        req["seed"] = a.seed
    if a.max_new_tokens is not None:
        req["max_new_tokens"] = a.max_new_tokens
    return req


def _finish(code: int) -> str:
    return generator_pb2.FinishReason.Name(code).removeprefix("FINISH_REASON_").lower()


def _summary(finish: int, usage: generator_pb2.Usage, spec: generator_pb2.SpeculationStats) -> str:
    line = f"[{_finish(finish)}; {usage.prompt_tokens} prompt + {usage.completion_tokens} generated tokens"
    if spec.blocks:
        line += (f"; speculation by {spec.draft_role}: {spec.accepted_tokens}/{spec.drafted_tokens} drafts accepted "
                 f"({spec.acceptance_rate:.0%}), {spec.base_calls_per_token:.2f} base calls per token")
    return line + "]"


def _stub(a: argparse.Namespace) -> generator_pb2_grpc.GeneratorStub:
    """A Generator stub, over TLS when asked (a.tls); calls pass a.metadata (the bearer token)."""
    return generator_pb2_grpc.GeneratorStub(tls.channel(a.address, getattr(a, "tls", None)))


def generate(a: argparse.Namespace) -> int:
    stub = _stub(a)
    req = build_request(a, a.prompt)
    try:
        if a.stream:
            lps: list[float] = []
            for chunk in stub.Generate(generator_pb2.GenerateRequest(**req), timeout=a.timeout, metadata=getattr(a, "metadata", None)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                lps.extend(chunk.logprobs)
                if chunk.finish_reason:
                    sys.stdout.write("\n")
                    print(_summary(chunk.finish_reason, chunk.usage, chunk.speculation), file=sys.stderr)
            if a.logprobs:
                print("logprobs:", " ".join(f"{x:.3f}" for x in lps), file=sys.stderr)
        else:
            r = stub.Complete(generator_pb2.CompleteRequest(**req), timeout=a.timeout, metadata=getattr(a, "metadata", None))
            print(r.text)
            print(_summary(r.finish_reason, r.usage, r.speculation), file=sys.stderr)
            if a.logprobs:
                print("logprobs:", " ".join(f"{x:.3f}" for x in r.logprobs), file=sys.stderr)
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


CHAT_HELP = "Type a message and Enter. Ctrl-C stops an answer; /reset forgets the conversation; Ctrl-D or /exit quits."


def chat(a: argparse.Namespace, read: Callable[[str], str] = input, out: TextIO | None = None) -> int:
    """An interactive chat: each turn streams the answer to the conversation so far (sent as
    `messages`, rendered by the combiner with a chat template). Ctrl-C while an answer streams
    cancels that call and keeps what arrived as the assistant's turn; at the prompt it only
    clears the line. A failed turn is forgotten, so it can be retried."""
    out = out or sys.stdout
    if read is input and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and arrow-key history for input())
        except ImportError:  # not on every platform
            pass
    stub = _stub(a)
    history: list[dict] = [{"role": "system", "content": a.system}] if a.system else []
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = read("you> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = history[:1] if a.system else []
            print("[conversation forgotten]", file=sys.stderr)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": line})
        req = generator_pb2.GenerateRequest(**build_request(a, messages=history))
        call = stub.Generate(req, timeout=a.timeout, metadata=getattr(a, "metadata", None))
        answer: list[str] = []
        stopped = _cancel_on_sigint(call)
        try:
            for chunk in call:
                out.write(chunk.text)
                out.flush()
                answer.append(chunk.text)
                if chunk.finish_reason and a.verbose:
                    out.write("\n")
                    print(_summary(chunk.finish_reason, chunk.usage, chunk.speculation), file=sys.stderr)
        except KeyboardInterrupt:
            call.cancel()
            out.write(" [stopped]")
        except grpc.RpcError as e:
            if stopped.is_set():  # Ctrl-C cancelled it: keep what arrived
                out.write(" [stopped]\n")
                history.append({"role": "assistant", "content": "".join(answer)})
                continue
            history.pop()
            out.write("\n")
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
            continue
        finally:
            stopped.restore()
        out.write("\n")
        history.append({"role": "assistant", "content": "".join(answer)})


class _Stopped(threading.Event):
    def __init__(self, previous: Any = None) -> None:
        super().__init__()
        self.previous = previous

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _cancel_on_sigint(call: Any) -> _Stopped:
    """While an answer streams, Ctrl-C cancels the call (the stream then ends CANCELLED) instead
    of raising KeyboardInterrupt inside gRPC's wait for the next message, which can abort the
    process in gRPC's core. Only on the main thread (where signal handlers live)."""
    stopped = _Stopped()

    def handler(signum: int, frame: Any) -> None:
        stopped.set()
        call.cancel()

    try:
        stopped.previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C raises KeyboardInterrupt as usual
        pass
    return stopped


def info(a: argparse.Namespace) -> int:
    stub = _stub(a)
    try:
        print(stub.Info(generator_pb2.GeneratorInfoRequest(), timeout=a.timeout, metadata=getattr(a, "metadata", None)))
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    # The service entry points own their flags; hand them the rest of the line untouched.
    if argv and argv[0] == "load":
        # The load runner left the serving package for the lab (tools/lab, eftmesh-lab), as
        # serving stacks keep their benchmark clients apart; say where it went.
        print("error: `eftmesh load` is now `eftmesh-load`, from the lab: pip install -e tools/lab "
              "(make install does)", file=sys.stderr)
        raise SystemExit(2)
    if argv and argv[0] in ("logit", "combiner", "up"):
        cmd, rest = argv[0], argv[1:]
        if cmd == "logit":
            from eftmesh.logit.server import main as run
        elif cmd == "combiner":
            from eftmesh.combiner.server import main as run
        else:
            from eftmesh.launcher import main as run
        run(rest)
        return
    p = argparse.ArgumentParser(prog="eftmesh", description="Emulated fine-tuning over a gRPC mesh. Subcommands logit, combiner and up take --help too.")
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate", help="generate text from a combiner")
    g.add_argument("prompt", help="text to continue")
    g.add_argument("--address", default=DEFAULT_ADDRESS, help="combiner host:port (default: %(default)s)")
    g.add_argument("--stream", action="store_true", help="stream tokens as they are generated (Generate) instead of one response (Complete)")
    g.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds (default: %(default)s)")
    add_request_flags(g)
    tls.add_client_args(g, what="the combiner")
    auth.add_client_args(g)
    c = sub.add_parser("chat", help="chat with a combiner in the terminal (streams; Ctrl-C stops an answer)")
    c.add_argument("--address", default=DEFAULT_ADDRESS, help="combiner host:port (default: %(default)s)")
    c.add_argument("--system", default="", help="a system message that opens the conversation (if the chat template takes one)")
    c.add_argument("--chat-template-role", default="", help="role whose chat template renders the conversation (default: the first delta's tuned role)")
    c.add_argument("--timeout", type=float, default=300.0, help="deadline of one answer in seconds (default: %(default)s)")
    c.add_argument("--verbose", action="store_true", help="print finish reason, token counts and speculation after each answer")
    add_request_flags(c)
    tls.add_client_args(c, what="the combiner")
    auth.add_client_args(c)
    i = sub.add_parser("info", help="show a combiner's roles, upstream models and defaults")
    i.add_argument("--address", default=DEFAULT_ADDRESS, help="combiner host:port (default: %(default)s)")
    i.add_argument("--timeout", type=float, default=10.0, help="deadline in seconds (default: %(default)s)")
    tls.add_client_args(i, what="the combiner")
    auth.add_client_args(i)
    sub.add_parser("logit", help="run one logit service (see: eftmesh logit --help)")
    sub.add_parser("combiner", help="run the combiner (see: eftmesh combiner --help)")
    sub.add_parser("up", help="run the whole mesh on loopback and stream a generation (see: eftmesh up --help)")
    a = p.parse_args(argv)
    try:
        a.tls = tls.client_from_args({"generate": g, "chat": c, "info": i}[a.cmd], a)
        a.metadata = auth.client_metadata(auth.client_token(a))
    except (ValueError, OSError) as e:
        p.error(str(e))
    sys.exit({"generate": generate, "chat": chat, "info": info}[a.cmd](a))


if __name__ == "__main__":
    main()
