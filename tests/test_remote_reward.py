"""A --reward-model entry http://HOST:PORT/PATH: the texts a module:function gets, POSTed as JSON in batches to a
scoring server; its answers checked, requests retried while it is down, one error line when it stays down or answers
badly. The servers run in a thread of the test (http.server on 127.0.0.1); the end-to-end runs are ppo.py on the
built-in task with tiny settings."""

import http.server
import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_ONLINE, error_line, free_port, read_run, run_pairs

import common
import released


def chars(payload) -> list:
    """The scores of the good servers: the number of characters of each response."""
    return [len(response) for response in payload["responses"]]


def answer_json(obj, status=200):
    return status, json.dumps(obj).encode()


class Quiet(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):  # a client that gave up on a slow answer: not the test's concern
        pass


class ScoringServer:
    """A server on 127.0.0.1 (a free port) in a daemon thread. answer(request number from 1, payload) -> (HTTP status,
    body); `payloads` holds what it was posted, in order."""

    def __init__(self, answer):
        self.payloads = []
        payloads = self.payloads

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                payloads.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, body = answer(len(payloads), payloads[-1])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/score"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def rows(self, key="responses") -> list:
        return [row for payload in self.payloads for row in payload[key]]


@pytest.fixture
def serve():
    """serve(answer) -> a running ScoringServer, closed after the test."""
    servers = []

    def start(answer):
        servers.append(ScoringServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(released, "REMOTE_BACKOFF", 0.01)
    monkeypatch.setattr(released, "REMOTE_TIMEOUT", 0.5)


PROMPTS = ["the film", "a plot", "the actor", "the ending", "the music"]
RESPONSES = ["was great", "was dull and long", "felt hollow", "is so charming", "was loud"]


@pytest.fixture(scope="module")
def batch():
    """Five rows (prompt | response) of the built-in policy's tokens, and the prompts as a dataset would give them:
    text, and one list of chat messages (which JSON carries as it is)."""
    tokenizer = common.load_tokenizer("builtin")
    rows = common.encode_offline_rows(tokenizer, PROMPTS, RESPONSES, max_prompt_length=8, max_new_tokens=8, context=64)
    prompts = [*PROMPTS[:4], [{"role": "user", "content": PROMPTS[4]}]]
    return tokenizer, rows, prompts


def test_the_server_gets_what_a_reward_function_gets_in_batches(batch, serve, monkeypatch, tmp_path):
    tokenizer, rows, prompts = batch
    (tmp_path / "text_rewards.py").write_text(
        "CALLS = []\n"
        "def spy(prompts, responses):\n"
        "    CALLS.append((prompts, responses))\n"
        "    return [len(r) for r in responses]\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(released, "REMOTE_BATCH", 2)
    server = serve(lambda n, payload: answer_json({"scores": chars(payload)}))
    remote = common.load_reward(server.url, tokenizer)(*rows, prompts)
    local = common.load_reward("text_rewards:spy", tokenizer)(*rows, prompts)
    import text_rewards

    assert remote.dtype == torch.float32
    assert remote.tolist() == local.tolist() == [float(len(r)) for r in text_rewards.CALLS[0][1]]
    assert [len(payload["responses"]) for payload in server.payloads] == [2, 2, 1]  # REMOTE_BATCH rows a request
    assert [len(payload["prompts"]) for payload in server.payloads] == [2, 2, 1]
    assert (server.rows("prompts"), server.rows()) == text_rewards.CALLS[0]  # the same texts, chat messages as given
    assert [response.strip() for response in server.rows()] == RESPONSES  # decoded after the prompt: ' was'


def test_an_upper_case_scheme_is_a_url_too(batch, serve):
    tokenizer, rows, prompts = batch
    server = serve(lambda n, payload: answer_json({"scores": [1.5] * len(payload["responses"])}))
    assert common.load_reward(server.url.replace("http://", "HTTP://"), tokenizer)(*rows, prompts).tolist() == [1.5] * 5


def test_5xx_and_timeouts_are_retried(batch, serve, fast_retries):
    tokenizer, rows, prompts = batch

    def flaky(n, payload):
        if n == 2:
            time.sleep(1.0)  # past REMOTE_TIMEOUT: the client gives up and asks again
        return answer_json({"error": "busy"}, status=503) if n == 1 else answer_json({"scores": chars(payload)})

    server = serve(flaky)
    t0 = time.time()
    assert common.load_reward(server.url, tokenizer)(*rows, prompts).tolist() == [float(len(r)) + 1 for r in RESPONSES]
    assert len(server.payloads) == 3
    assert time.time() - t0 < 5


def test_a_server_that_stays_down_is_one_line_naming_it(batch, fast_retries):
    tokenizer, rows, prompts = batch
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens there
    score = common.load_reward(url, tokenizer)
    t0 = time.time()
    with pytest.raises(SystemExit) as stop:
        score(*rows, prompts)
    message = str(stop.value)
    assert message.startswith(f"error: the reward server at {url} did not answer after {released.REMOTE_TRIES} tries")
    assert "refused" in message and "start it" in message and "\n" not in message
    assert time.time() - t0 < 5


BAD_ANSWERS = {
    "short": (
        lambda n, payload: answer_json({"scores": chars(payload)[:-1]}),
        "answered 4 scores for 5 responses; it must answer one per response",
    ),
    "strings": (
        lambda n, payload: answer_json({"scores": ["high"] * len(payload["responses"])}),
        'answered the score "high"; each score must be a number',
    ),
    "null": (
        lambda n, payload: answer_json({"scores": [None] * len(payload["responses"])}),
        "answered the score null; each score must be a number",
    ),
    "nan": (
        lambda n, payload: answer_json({"scores": [1.0, float("nan"), 1.0, 1.0, 1.0]}),
        "answered the score nan; each score must be a finite number",
    ),
    "inf": (
        lambda n, payload: (200, b'{"scores": [1, 2, 3, 4, 1e999]}'),
        "answered the score inf; each score must be a finite number",
    ),
    "not_json": (
        lambda n, payload: (200, b"<html>\n<body>Welcome</body>\n</html>"),
        "answered '<html> <body>Welcome</body> </html>', which is not JSON; it must take a POST of JSON",
    ),
    "no_scores": (
        lambda n, payload: answer_json({"rewards": chars(payload)}),
        'without a "scores" list; it must take a POST of JSON {"prompts": [...], "responses": [...]} and answer',
    ),
    "not_found": (
        lambda n, payload: answer_json({"detail": "Not Found"}, status=404),
        'answered HTTP 404 \'{"detail": "Not Found"}\'; it must take a POST of JSON',
    ),
}


@pytest.mark.parametrize("bad", BAD_ANSWERS)
def test_a_bad_answer_is_one_line_naming_the_server_and_the_fix(batch, serve, fast_retries, bad):
    tokenizer, rows, prompts = batch
    answer, expected = BAD_ANSWERS[bad]
    server = serve(answer)
    with pytest.raises(SystemExit) as stop:
        common.load_reward(server.url, tokenizer)(*rows, prompts)
    message = str(stop.value)
    assert message.startswith(f"error: the reward server at {server.url} "), message
    assert expected in message and "\n" not in message, message
    assert len(server.payloads) == 1  # a bad answer is not retried


def test_an_entry_that_is_not_a_url_of_a_server(batch):
    with pytest.raises(SystemExit, match=r"--reward-model http://host:port/score is not a server's URL; give it as"):
        common.load_reward("http://host:port/score", batch[0])


@pytest.fixture(scope="module")
def runs(builtin_path, tmp_path_factory):
    """ppo.py on the built-in reward, on the built-in reward + 0.5 × a server's characters, and on the built-in
    reward + a server that answers one score too few: .procs (name -> CompletedProcess), .dirs (name -> output
    folder), and the two servers .good and .short."""
    tmp = tmp_path_factory.mktemp("remote")
    good = ScoringServer(lambda n, payload: answer_json({"scores": chars(payload)}))
    short = ScoringServer(lambda n, payload: answer_json({"scores": chars(payload)[:-1]}))
    jobs = {
        "base": ("ppo.py", [*TINY_ONLINE, "--output-dir", f"{tmp}/base"], {}),
        "sum": (
            "ppo.py",
            [*TINY_ONLINE, "--reward-model", "builtin", good.url, "--reward-weights", "1", "0.5"]
            + ["--output-dir", f"{tmp}/sum"],
            {},
        ),
        "short": ("ppo.py", [*TINY_ONLINE, "--reward-model", "builtin", short.url, "--output-dir", f"{tmp}/short"], {}),
    }
    yield SimpleNamespace(procs=run_pairs(jobs), dirs={name: tmp / name for name in jobs}, good=good, short=short)
    good.close()
    short.close()


def test_ppo_sums_a_reward_model_and_a_server(runs):
    for name in ("base", "sum"):
        assert runs.procs[name].returncode == 0, runs.procs[name].stderr[-3000:]
    _, base = read_run(runs.dirs["base"])
    _, records = read_run(runs.dirs["sum"])
    payloads = runs.good.payloads
    # the evaluation before training, then per iteration its rollout and its evaluation: 16 rows each, scored
    # --forward-batch-size (the mini-batch, 8) rows at a time, each its own request
    assert [len(p["responses"]) for p in payloads] == [8] * 10
    assert all(len(p["prompts"]) == 8 and all(isinstance(t, str) and t for t in p["prompts"]) for p in payloads)
    responses = runs.good.rows()
    # same seed, same policy before the first update: the evaluation before training and the first rollout sample
    # what the run without the server sampled, so the logged proxy reward is its score + 0.5 × characters
    for key, step, rows in [("eval/reward", 0, slice(0, 16)), ("rollout/score", 1, slice(16, 32))]:
        extra = 0.5 * sum(len(r) for r in responses[rows]) / 16
        assert extra > 0
        assert records[step][key] == pytest.approx(base[step][key] + extra, abs=1e-4), (key, records[step], base[step])


def test_ppo_stops_with_one_line_when_the_server_answers_badly(runs):
    line = error_line(runs.procs["short"])
    assert line == (
        f"error: the reward server at {runs.short.url} answered 7 scores for 8 responses; it must answer one per "
        f"response"
    )
    assert len(runs.short.payloads) == 1
