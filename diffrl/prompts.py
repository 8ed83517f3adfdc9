"""Prompt sources: an inline list, a text file (one prompt per line), or a built-in set.

Built-in sets follow DDPO (Black et al. 2024, Sec. 6): ``simple_animals`` (45 common animals,
used for the aesthetic task) and ``nouns_activities`` ("<animal> <activity>", the prompt-alignment
task's "a(n) [animal] [activity]" template). The toy world's fixed splits are
``toy_{train,heldout}_{single,pair,all,geneval}`` (see :mod:`diffrl.toyworld`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffrl import toyworld
from diffrl.errors import ConfigError, InputFileError

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox "
    "wolf lizard beetle ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog "
    "chicken duck goose bee pig turkey fly llama camel bat gorilla hedgehog kangaroo"
).split()

ACTIVITIES = (
    "riding a bike",
    "playing chess",
    "washing the dishes",
    "reading a book",
    "cooking dinner",
    "playing the piano",
    "painting a picture",
    "flying a kite",
    "driving a car",
    "taking a selfie",
)


@dataclass
class PromptSource:
    """A named, fixed list of prompts to draw training batches from; ``tasks`` holds each prompt's
    GenEval task where the source has them, and ``balance`` says how :meth:`sample` draws."""

    name: str
    prompts: list[str]
    tasks: list[str] | None = None
    balance: str = "none"

    def sample(self, n: int, generator: torch.Generator | None = None) -> list[str]:
        """``n`` prompts drawn with replacement (reproducible with ``generator``): uniformly over the
        prompts, or with ``balance="task"`` a task uniformly and then uniformly among its prompts,
        so each of the K tasks is drawn with probability 1/K."""
        if self.balance == "none":
            index = torch.randint(len(self.prompts), (n,), generator=generator).tolist()
        else:
            groups = self.task_groups()
            task = torch.randint(len(groups), (n,), generator=generator).tolist()
            within = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
            index = [groups[t][int(u * len(groups[t]))] for t, u in zip(task, within, strict=True)]
        return [self.prompts[i] for i in index]

    def task_groups(self) -> list[list[int]]:
        """Prompt indices of each task, tasks in sorted order."""
        groups: dict[str, list[int]] = {}
        for i, task in enumerate(self.tasks or []):
            groups.setdefault(task, []).append(i)
        return [groups[t] for t in sorted(groups)]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


BUILTIN_PROMPTS = {
    "simple_animals": lambda: list(SIMPLE_ANIMALS),
    "nouns_activities": lambda: [f"{_article(a)} {a} {act}" for a in SIMPLE_ANIMALS for act in ACTIVITIES],
    **{
        f"toy_{split}_{kind}": (lambda split=split, kind=kind: toyworld.prompts(split, kind))
        for split in ("train", "heldout")
        for kind in ("single", "pair", "all", "geneval")
    },
}


def load_prompts(
    source: str | list[str], balance: str = "none", tasks: list[str] | None = None
) -> PromptSource:
    """A :class:`PromptSource` from a list of prompts, a built-in set name, or a text file path,
    drawn as ``balance`` says (:attr:`diffrl.config.PromptsConfig.balance`), with only the prompts
    of the GenEval ``tasks`` kept when given (:attr:`diffrl.config.PromptsConfig.tasks`).

    Text files hold one prompt per line; blank lines and lines starting with ``#`` are skipped.
    A ``.jsonl`` file is a GenEval-layout prompt file (:mod:`diffrl.geneval`): its rows' prompts,
    each with its row's ``tag`` as task (as do ``toy_{train,heldout}_geneval``).
    """
    task_of = None
    if isinstance(source, (list, tuple)):
        prompts, name = [str(p) for p in source], "inline"
    elif source in BUILTIN_PROMPTS:
        prompts, name = BUILTIN_PROMPTS[source](), source
        if source.endswith("_geneval"):
            task_of = [row["tag"] for row in toyworld.geneval_rows(source.split("_")[1])]
    elif str(source).endswith(".jsonl"):  # GenEval's layout: the rows' prompts, in file order
        from diffrl.geneval import read_suite

        rows = read_suite(Path(source).expanduser())
        prompts, task_of, name = [row["prompt"] for row in rows], [row["tag"] for row in rows], str(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise InputFileError(
                f"prompt source {source!r}: no such file, and not a built-in set ({', '.join(BUILTIN_PROMPTS)})"
            )
        lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        prompts, name = [line for line in lines if line and not line.startswith("#")], str(path)
    if not prompts:
        raise InputFileError(f"prompt source {source!r} holds no prompts")
    if balance not in ("none", "task"):
        raise ConfigError(f"prompts.balance: {balance!r} is not one of none, task")
    for key, wanted in (("prompts.balance: task", balance == "task"), ("prompts.tasks", tasks is not None)):
        if wanted and task_of is None:
            raise ConfigError(
                f"{key} needs prompts that carry GenEval tasks (a GenEval .jsonl file, "
                f"toy_train_geneval or toy_heldout_geneval); prompts.source {name!r} has none"
            )
    if tasks is not None:
        prompts, task_of = _only_tasks(prompts, task_of, list(tasks), name)
    return PromptSource(name=name, prompts=prompts, tasks=task_of, balance=balance)


def configured_prompts(prompts) -> PromptSource:
    """The training prompt source a config's ``prompts`` section describes
    (:class:`diffrl.config.PromptsConfig`: its source, balance and tasks)."""
    return load_prompts(prompts.source, prompts.balance, prompts.tasks)


def _only_tasks(prompts: list[str], task_of: list[str], tasks: list[str], name: str):
    """The prompts (and their tasks) whose task is one of ``tasks``; a task the source does not
    have is refused, naming the ones it has."""
    have = ", ".join(sorted(set(task_of)))
    unknown = [task for task in tasks if task not in task_of]
    if unknown:
        raise ConfigError(
            f"prompts.tasks: {', '.join(unknown)} not among the tasks of prompts.source {name!r} ({have})"
        )
    if not tasks:
        raise ConfigError(f"prompts.tasks: an empty list keeps no prompt (null keeps them all: {have})")
    kept = [i for i, task in enumerate(task_of) if task in tasks]
    return [prompts[i] for i in kept], [task_of[i] for i in kept]
