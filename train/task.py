"""Prompts, answers and answer checking.

Three sources of prompts:
- ``arithmetic``: a synthetic task generated in code (two-digit addition, the sum written least
  significant digit first, e.g. ``37+45=`` -> ``28``), with exact answer checking. Held-out prompts
  are a fixed, seeded set of operand pairs that training never samples; a second such set
  (validation) is what preparation's early stop reads (``split_sizes``).
- ``long_arithmetic``: repeated addition with every partial result written out, all numbers least
  significant digit first (``12840+7*4=``: the running total of 4821 after each of four additions of
  7): responses of ~40 tokens whose positions differ in how teachable they are (copies, digit sums,
  carries), exact answer checking on the final total.
- a local JSONL / Parquet file, or a Hugging Face dataset by name, with configurable prompt / answer
  fields; answers are checked as math answers (``\\boxed{..}`` or the last number, normalised).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, List, Optional

# ---------------------------------------------------------------- arithmetic task


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str  # what the answer check compares against
    solution: Optional[str] = None  # the full SFT target when it is more than the answer (worked solutions)
    unscored: tuple = ()  # indices of target characters SFT does not train on (corrupted digits)

    @property
    def target(self) -> str:
        """The response SFT trains on: the worked solution if there is one, else the answer."""
        return self.answer if self.solution is None else self.solution


HELD_OUT_RESERVE = 1024  # pairs never trained on, the held-out set drawn from their front
VALIDATION_SIZE = 256  # further pairs never trained on, for preparation's early stop


def split_sizes(n_pairs: int, num_eval: int) -> tuple:
    """(reserved, validation) pair counts of a built-in task with ``n_pairs`` (prompt) pairs.

    The held-out set is the first ``num_eval`` of ``reserved`` pairs that training never samples, so any
    ``data.eval_size`` up to the reserve trains on the same pairs (and prepares the same models); the
    ``validation`` pairs after them, also never trained on, are what preparation's early stop reads, so
    the held-out accuracy the driver reports was not used to choose the prepared models."""
    reserved = max(num_eval, min(HELD_OUT_RESERVE, n_pairs // 8))
    return reserved, min(VALIDATION_SIZE, max(1, n_pairs // 8))


class ArithmeticTask:
    """a+b with 0 <= a, b <= max_operand; the response is the sum's digits reversed (little-endian).

    Little-endian sums are the classic trick that makes addition learnable by a tiny transformer in a
    few hundred steps: each output digit depends on the operands' digits and the carry just produced.
    """

    name = "arithmetic"

    def __init__(self, max_operand: int = 99, num_eval: int = 256, seed: int = 0):
        self.max_operand = max_operand
        n = (max_operand + 1) ** 2
        reserved, num_val = split_sizes(n, num_eval)
        if n - reserved - num_val < n // 4:
            raise ValueError(f"data.eval_size={num_eval} leaves too few training pairs (only {n} exist)")
        rng = random.Random(seed + 1_000_003)
        pairs = [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]
        rng.shuffle(pairs)
        self.eval_pairs = sorted(pairs[:num_eval])
        self.validation_pairs = sorted(pairs[reserved:reserved + num_val])
        self.train_pairs = sorted(pairs[reserved + num_val:])
        self.split = (reserved, num_val)

    @staticmethod
    def format(a: int, b: int) -> Example:
        return Example(prompt=f"{a}+{b}=", answer=str(a + b)[::-1])

    def train_example(self, rng: random.Random) -> Example:
        return self.format(*self.train_pairs[rng.randrange(len(self.train_pairs))])

    def eval_examples(self) -> List[Example]:
        return [self.format(a, b) for a, b in self.eval_pairs]

    def validation_examples(self) -> List[Example]:
        return [self.format(a, b) for a, b in self.validation_pairs]

    @staticmethod
    def check(response: str, answer: str) -> bool:
        return response.strip() == answer

    def alphabet(self) -> str:
        return "0123456789+="


class LongArithmeticTask:
    """Repeated addition with every partial result written out: start + k, ``chain`` times.

    ``12840+7*4=`` -> ``12840+7;92840+7;63840+7;33840+7;00940``: the start (4821) and the running total
    after each of ``chain`` additions of k, each written with ``digits + 1`` digits, least significant
    first and zero-padded (as the ``arithmetic`` task writes its sums: each digit then depends on
    digits already seen), separated by ``+k;`` while additions remain. Every character is one Qwen BPE
    token, so with the defaults (4-digit start, chain 4) a response is 37 tokens plus EOS. Positions
    differ in how teachable they are: separators and the repeated ``+k`` are copies, the first total
    copies the prompt, a digit that receives no carry copies the same digit one total earlier (a fixed
    offset back), the lowest digit is a digit sum and a carried digit depends on the carry chain. The
    answer check is exact on the final total (the text after the last ``;``). Held-out prompts are a
    fixed set of (start, k) pairs, the same for every run seed (so that seeds compare on one held-out
    set), that training never samples; validation pairs, also never trained on, serve the early stop
    of preparation (``split_sizes``).
    """

    name = "long_arithmetic"

    def __init__(self, digits: int = 4, num_eval: int = 256, seed: int = 0, chain: int = 4):
        if digits < 1 or chain < 1:
            raise ValueError(f"long_arithmetic: digits={digits} and chain={chain} must be >= 1")
        self.digits, self.chain = digits, chain
        self.max_operand = 10 ** digits - 1
        n = (self.max_operand + 1) * 9
        reserved, num_val = split_sizes(n, num_eval)
        if n - reserved - num_val < n // 4:
            raise ValueError(f"data.eval_size={num_eval} is too large for {digits}-digit starts")
        del seed  # the held-out set does not depend on the run seed
        rng = random.Random(2_000_003 + digits)
        drawn, seen = [], set()  # distinct pairs in the order drawn: held-out first, then validation
        while len(drawn) < reserved + num_val:
            pair = (rng.randint(0, self.max_operand), rng.randint(1, 9))
            if pair not in seen:
                seen.add(pair)
                drawn.append(pair)
        self.eval_pairs = sorted(drawn[:num_eval])
        self.validation_pairs = sorted(drawn[reserved:])
        self._not_trained = frozenset(drawn)
        self.split = (reserved, num_val)
        width = digits + 1
        # the longest response in tokens: chain steps of (total, '+', k, ';'), the last total, EOS
        self.max_response_tokens = chain * (width + 3) + width + 1

    def little_endian(self, n: int) -> str:
        """``n`` with ``digits + 1`` digits, zero-padded, least significant first."""
        return f"{n:0{self.digits + 1}d}"[::-1]

    def prompt(self, start: int, k: int) -> str:
        return f"{self.little_endian(start)}+{k}*{self.chain}="

    def format(self, start: int, k: int) -> Example:
        totals = [self.little_endian(start + i * k) for i in range(self.chain + 1)]
        solution = "".join(f"{t}+{k};" for t in totals[:-1]) + totals[-1]
        return Example(prompt=self.prompt(start, k), answer=totals[-1], solution=solution)

    def _train_pair(self, rng: random.Random) -> tuple:
        while True:
            pair = (rng.randint(0, self.max_operand), rng.randint(1, 9))
            if pair not in self._not_trained:
                return pair

    def train_example(self, rng: random.Random) -> Example:
        return self.format(*self._train_pair(rng))

    def corrupted_example(self, rng: random.Random) -> Example:
        """A training example with one wrong digit in one of the first ``chain`` totals, every later
        total continuing from the wrong one (each total is the previous written total plus k).

        SFT on these (``sft.teacher_noise``) makes a teacher that continues correctly from a student's
        mistake, as a real teacher does on any prefix: without them a teacher trained on clean
        solutions only is confidently arbitrary after the first wrong digit, and the positions OPD
        scores there teach nothing. The wrong digit itself is ``unscored``."""
        start, k = self._train_pair(rng)
        width = self.digits + 1
        i, j = rng.randrange(self.chain), rng.randrange(self.digits)  # the top digit stays: no overflow
        totals = [start + n * k for n in range(self.chain + 1)]
        digits = list(self.little_endian(totals[i]))
        digits[j] = str((int(digits[j]) + rng.randint(1, 9)) % 10)
        wrong = int("".join(digits)[::-1])
        written = [self.little_endian(t) for t in totals[:i]] + [self.little_endian(wrong + n * k)
                                                                 for n in range(self.chain + 1 - i)]
        solution = "".join(f"{t}+{k};" for t in written[:-1]) + written[-1]
        return Example(prompt=self.prompt(start, k), answer=written[-1], solution=solution,
                       unscored=(i * (width + 3) + j,))

    def eval_examples(self) -> List[Example]:
        return [self.format(a, k) for a, k in self.eval_pairs]

    def validation_examples(self) -> List[Example]:
        return [self.format(a, k) for a, k in self.validation_pairs]

    @staticmethod
    def final_answer(response: str) -> Optional[str]:
        """The text after the last ';' (None if there is none)."""
        text = response.strip()
        return text.rsplit(";", 1)[1] if ";" in text else None

    @classmethod
    def check(cls, response: str, answer: str) -> bool:
        return cls.final_answer(response) == answer

    def alphabet(self) -> str:
        return "0123456789+*=;"


# ---------------------------------------------------------------- prompts from a file or a dataset


class PromptDataset:
    """Prompts with reference answers from JSONL / Parquet / an HF dataset; math answer checking."""

    name = "prompts"

    def __init__(self, source: str, *, prompt_field: str, answer_field: str, split: str = "train",
                 eval_source: Optional[str] = None, eval_split: Optional[str] = None, num_eval: int = 256,
                 seed: int = 0):
        rows = load_rows(source, split)
        self._check_fields(rows, source, prompt_field, answer_field)
        examples = [Example(str(r[prompt_field]), str(r[answer_field])) for r in rows]
        if eval_source:
            eval_rows = load_rows(eval_source, eval_split or split)
            self._check_fields(eval_rows, eval_source, prompt_field, answer_field)
            self.eval = [Example(str(r[prompt_field]), str(r[answer_field])) for r in eval_rows][:num_eval]
            self.train = examples
        else:
            rng = random.Random(seed + 1_000_003)
            order = list(range(len(examples)))
            rng.shuffle(order)
            k = min(num_eval, max(len(examples) - 1, 0))
            self.eval = [examples[i] for i in sorted(order[:k])]
            self.train = [examples[i] for i in sorted(order[k:])]
        if not self.train:
            raise ValueError(f"data.source={source!r} has no training prompts")

    @staticmethod
    def _check_fields(rows, source, prompt_field, answer_field):
        if not rows:
            raise ValueError(f"data.source={source!r} holds no rows")
        for key, field in (("data.prompt_field", prompt_field), ("data.answer_field", answer_field)):
            if field not in rows[0]:
                raise ValueError(f"{key}={field!r} is not a field of {source!r}; fields: {sorted(rows[0])}")

    def train_example(self, rng: random.Random) -> Example:
        return self.train[rng.randrange(len(self.train))]

    def eval_examples(self) -> List[Example]:
        return list(self.eval)

    @staticmethod
    def check(response: str, answer: str) -> bool:
        return math_equal(extract_answer(response), extract_answer(answer) or answer)


def load_rows(source: str, split: str = "train") -> List[dict]:
    """Rows of a .jsonl / .json / .parquet file, or of a Hugging Face dataset (name or local dir)."""
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix in (".jsonl", ".ndjson"):
            with open(path, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            return data if isinstance(data, list) else data[split]
        if path.suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError("reading Parquet prompts needs pyarrow (pip install pyarrow)") from e
            return pq.read_table(path).to_pylist()
        raise ValueError(f"data.source={source!r}: unsupported file type {path.suffix!r} "
                         "(use .jsonl, .json or .parquet)")
    try:
        import datasets
    except ImportError as e:
        raise FileNotFoundError(
            f"data.source={source!r} is not a local file and the `datasets` package is not installed to load "
            "it as a Hugging Face dataset; point data.source at a local .jsonl/.parquet file") from e
    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as e:  # network errors, missing dataset
        raise RuntimeError(f"could not load data.source={source!r} (split {split!r}) as a Hugging Face dataset: "
                           f"{e}. Without network, download it elsewhere and point data.source at a local "
                           ".jsonl/.parquet file or a saved dataset directory") from e


# ---------------------------------------------------------------- math answer checking

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _last_boxed(text: str) -> Optional[str]:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i = depth = starts[-1]
    depth = 1
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1]:i]
        i += 1
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution: the last \\boxed{...}, else the text after '####', else the last number."""
    text = str(text)
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    nums = _NUMBER.findall(text)
    return nums[-1] if nums else None


def _normalize(ans: str) -> str:
    s = ans.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|,|!|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^{\\circ}", "").replace("^\\circ", "")
    s = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"(\1)/(\2)", s)
    s = s.replace(" ", "").replace(",", "") if re.fullmatch(r"[-\d,\s.]+", s) else s.replace(" ", "")
    s = s.rstrip(".")
    return s


def _as_number(s: str) -> Optional[Fraction]:
    t = s.replace("(", "").replace(")", "").replace("%", "")
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            return Fraction(num) / Fraction(den)
        return Fraction(t)
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(pred: Optional[str], ref: Optional[str]) -> bool:
    """Equal as normalised strings, or as numbers (1e-6 relative tolerance)."""
    if pred is None or ref is None:
        return False
    a, b = _normalize(pred), _normalize(ref)
    if a == b:
        return True
    x, y = _as_number(a), _as_number(b)
    if x is None or y is None:
        return False
    return math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)


BUILTIN_TASKS = ("arithmetic", "long_arithmetic", "lookup")  # generated in code; the built-in models can be prepared on them


def build_task(data_cfg, seed: int):
    if data_cfg.source == "arithmetic":
        return ArithmeticTask(max_operand=data_cfg.max_operand, num_eval=data_cfg.eval_size, seed=seed)
    if data_cfg.source == "long_arithmetic":
        return LongArithmeticTask(digits=data_cfg.digits, chain=data_cfg.chain, num_eval=data_cfg.eval_size, seed=seed)
    if data_cfg.source == "lookup":
        from .lookup_task import LookupTask  # imports this module

        return LookupTask(num_eval=data_cfg.eval_size, seed=seed)
    return PromptDataset(data_cfg.source, prompt_field=data_cfg.prompt_field, answer_field=data_cfg.answer_field,
                         split=data_cfg.split, eval_source=data_cfg.eval_source, eval_split=data_cfg.eval_split,
                         num_eval=data_cfg.eval_size, seed=seed)


Checker = Callable[[str, str], bool]
