"""A task YAML naming the user's own model builder, dataset maker and plain state-dict checkpoint
(``model: {python: ...}``, ``dataset: {python: ...}``), run from the command line."""

from __future__ import annotations

import json
import textwrap

import torch

from automlprune.cli.main import main

USER_MODULE = textwrap.dedent('''
    import torch
    from sklearn.datasets import load_digits
    from torch import nn


    def small_net(num_classes, width=8):
        return nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


    def digit_data(test_size=297):
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target)
        return {"train": (x[:-test_size], y[:-test_size]), "test": (x[-test_size:], y[-test_size:]), "num_classes": 10}
''')


def test_a_task_of_the_user_s_own_code_and_state_dict_runs_from_the_command_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "mynets").mkdir()
    (tmp_path / "mynets" / "__init__.py").write_text("")
    (tmp_path / "mynets" / "parts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from mynets.parts import digit_data, small_net  # the user trains their model their own way

    torch.manual_seed(0)
    model, data = small_net(10), digit_data()
    x, y = data["train"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(20):  # about 94 % test accuracy
        for i in range(0, len(x), 100):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            optimizer.step()
    torch.save(model.state_dict(), tmp_path / "weights.pt")  # a plain state dict
    (tmp_path / "task.yaml").write_text(textwrap.dedent('''
        name: my-digits
        model: {python: "mynets.parts:small_net", kwargs: {width: 8}}
        dataset: {python: "mynets.parts:digit_data"}
        checkpoint: weights.pt
    '''))
    monkeypatch.chdir(tmp_path)
    assert main(["inspect", "task.yaml", "--json"]) == 0
    groups = json.loads(capsys.readouterr().out)["groups"]
    assert sum(not g["pinned"] for g in groups) >= 2
    assert main(["search", "task.yaml", "--strategy", "uniform", "--budget", "macs=0.5", "--evals", "1", "--run-dir", "run",
                 "--no-export", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answers"][0]["answer"]
    assert answer["relative"]["macs"] <= 0.5 and answer["accuracy"] > 0.15  # above chance (0.1) at half the MACs of a tiny net
    assert main(["evaluate", "task.yaml", "--uniform", "1.0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] > 0.85  # the user's weights, as they trained them
