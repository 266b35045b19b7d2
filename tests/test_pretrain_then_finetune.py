"""The pure helpers of benchmarks/pretrain_then_finetune.py: corpus preparation from hard-wrapped text, the
majority-class baseline, report tables, stage skipping and metrics reading (no ../shared/data, no training)."""

import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ptf():
  spec = importlib.util.spec_from_file_location(
      "pretrain_then_finetune", os.path.join(ROOT, "benchmarks", "pretrain_then_finetune.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


BOOK = ("\ufeffThe Project Gutenberg eBook of A Test\r\n\r\nTitle: A Test\r\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\n\r\nCHAPTER I.\r\n\r\n"
        "It was a dark and stormy night; the rain fell in\r\n  torrents, except at occasional intervals,\r\n"
        "when it was checked.\r\n\r\n\r\nA second paragraph that is long enough to keep.\r\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK A TEST ***\r\nLicense text that must not appear.\r\n")


def test_corpus_joins_paragraphs_strips_the_gutenberg_frame_and_drops_short_lines(ptf, tmp_path):
  (tmp_path / "text" / "gutenberg").mkdir(parents=True)
  (tmp_path / "text" / "leipzig" / "sentences").mkdir(parents=True)
  (tmp_path / "text" / "tinyshakespeare").mkdir(parents=True)
  (tmp_path / "text" / "gutenberg" / "en_test.txt").write_bytes(BOOK.encode("utf-8"))
  (tmp_path / "text" / "gutenberg" / "de_test.txt").write_text("Ein deutscher Absatz, der nicht gelesen wird.\n")
  (tmp_path / "text" / "leipzig" / "sentences" / "eng_news_10K-sentences.txt").write_text(
      "1\tA sentence from the news that is long enough.\n2\tToo short.\n")
  (tmp_path / "text" / "leipzig" / "sentences" / "deu_news_10K-sentences.txt").write_text("1\tEin Satz.\n")
  (tmp_path / "text" / "tinyshakespeare" / "input.txt").write_text(
      "First Citizen:\nBefore we proceed any further,\nhear me speak.\n\nAll:\nSpeak.\n")
  sources = ptf.english_sources(str(tmp_path / "text"))
  assert [(os.path.basename(p), k) for p, k in sources] == [
      ("en_test.txt", "gutenberg"), ("eng_news_10K-sentences.txt", "leipzig"), ("input.txt", "paragraphs")]
  out = tmp_path / "w" / "corpus.txt"
  stats = ptf.prepare_corpus(sources, str(out), min_chars=20)
  lines = out.read_text(encoding="utf-8").split("\n")
  assert lines == [
      "It was a dark and stormy night; the rain fell in torrents, except at occasional intervals, when it was "
      "checked.",
      "A second paragraph that is long enough to keep.",
      "A sentence from the news that is long enough.",
      "First Citizen: Before we proceed any further, hear me speak.",
      ""]
  assert stats["documents"] == 4 and stats["bytes"] == out.stat().st_size
  assert stats["skipped_short"] == 3  # "CHAPTER I.", "Too short.", "All: Speak."
  assert [s["documents"] for s in stats["sources"]] == [2, 1, 1]
  assert not (tmp_path / "w" / "corpus.txt.tmp").exists()


def test_a_book_without_markers_is_read_whole(ptf):
  assert list(ptf.paragraphs(ptf.gutenberg_body(["a b", "c", "", "", "d  e"]))) == ["a b c", "d e"]


def test_majority_baseline(ptf):
  metrics, note = ptf.majority_metrics("rte", [0, 1, 1, 1], [0, 0, 1, 1, 1])
  assert metrics == {"accuracy": pytest.approx(0.6)} and "not_entailment" in note
  metrics, note = ptf.majority_metrics("mrpc", [1, 1, 0], [1, 0, 1, 1])
  assert metrics["accuracy"] == pytest.approx(0.75) and metrics["f1"] == pytest.approx(6 / 7)
  metrics, _ = ptf.majority_metrics("cola", [1, 1, 0], [0, 1, 1])
  assert metrics == {"mcc": 0.0}
  metrics, note = ptf.majority_metrics("stsb", [1.0, 3.0], [0.5, 2.0, 4.5])
  assert metrics == {"pearson": 0.0, "spearman": 0.0}
  assert "2.000" in note and "undefined: reported as 0" in note


def test_comparison_table_averages_main_metrics_and_marks_missing_runs(ptf):
  columns = {"majority": {"rte": {"accuracy": 0.5}, "stsb": {"pearson": 0.0, "spearman": 0.0}},
             "pretrained": {"rte": {"accuracy": 0.6}, "stsb": {"pearson": 0.8, "spearman": 0.7}},
             "random init": {"rte": {"accuracy": 0.55}, "stsb": None}}
  table = ptf.comparison_table(["rte", "stsb"], columns).split("\n")
  assert table[0] == "| task | metric | majority | pretrained | random init |"
  assert table[2] == "| RTE | acc | 50.0 | 60.0 | 55.0 |"
  assert table[3] == "| STS-B | Pearson | 0.0 | 80.0 | - |"
  assert table[4] == "| Average | 2 tasks | 25.0 | 70.0 | - |"


def test_stages_run_once_and_refuse_other_settings(ptf, tmp_path):
  calls = []
  directory = str(tmp_path / "stage")
  record = ptf.run_stage("s", directory, {"steps": 3, "set": ["a=1"]}, lambda: calls.append(1) or {"x": 2})
  assert calls == [1] and record["x"] == 2 and record["params"] == {"steps": 3, "set": ["a=1"]}
  again = ptf.run_stage("s", directory, {"steps": 3, "set": ("a=1",)}, lambda: calls.append(1))
  assert calls == [1] and again == record
  with pytest.raises(ptf.StageMismatch, match=r"'steps': \(3, 4\)"):
    ptf.run_stage("s", directory, {"steps": 4, "set": ["a=1"]}, lambda: calls.append(1))
  with pytest.raises(RuntimeError, match="boom"):  # A failed stage records nothing: the next run retries it.
    ptf.run_stage("t", str(tmp_path / "t"), {}, lambda: (_ for _ in ()).throw(RuntimeError("boom")))
  assert ptf.stage_record(str(tmp_path / "t")) is None
  (tmp_path / "t" / ptf.PARTIAL_FILE).write_text(json.dumps({"wall_s": 100.0, "attempts": 1}))
  record = ptf.run_stage("t", str(tmp_path / "t"), {}, lambda: None)
  assert record["attempts"] == 2 and 100.0 <= record["wall_s"] < 110.0  # The interrupted attempt's time counts.
  assert not (tmp_path / "t" / ptf.PARTIAL_FILE).exists()
  # While a stage runs its attempt is already on disk: a process killed outright (SIGKILL) still counts it.
  seen = []
  ptf.run_stage("u", str(tmp_path / "u"), {},
                lambda: seen.append(json.loads((tmp_path / "u" / ptf.PARTIAL_FILE).read_text())))
  assert seen[0]["attempts"] == 1 and 0.0 <= seen[0]["wall_s"] < 10.0


def test_metrics_records_and_curves(ptf, tmp_path):
  path = tmp_path / "metrics.jsonl"
  records = [{"step": 0, "split": "eval", "rtd_auc": 0.5}, {"step": 20, "split": "train", "loss": 3.0},
             {"step": 40, "split": "eval", "rtd_auc": 0.7, "cosine_E_G": 0.1},
             {"step": 40, "split": "eval", "rtd_auc": 0.75}]  # A resumed run repeated the step: the last wins.
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n{\"step\": 6")  # A line being written.
  assert ptf.last_step(str(path)) == 20
  assert ptf.last_eval(str(path))["step"] == 40
  assert ptf.eval_curve(str(path), "rtd_auc") == [(0, 0.5), (40, 0.75)]
  assert ptf.last_eval(str(tmp_path / "missing.jsonl")) is None
  png = ptf.plot_curves({"gdes_s0": str(path), "es_s1": str(path)}, str(tmp_path / "curves.png"))
  assert os.path.getsize(png) > 1000


def test_small_formatting_helpers(ptf):
  assert ptf.parse_max_train("sst2=8000", ["rte", "sst2"]) == {"rte": 0, "sst2": 8000}
  assert ptf.parse_max_train("sst2=8000,all=200", ["rte", "sst2"]) == {"rte": 200, "sst2": 8000}
  assert ptf.parse_max_train("100", ["rte"]) == {"rte": 100}
  assert ptf.parse_max_train("sst2=8000", ["rte"]) == {"rte": 0}
  with pytest.raises(ValueError, match="unknown task"):
    ptf.parse_max_train("sts=5", ["rte"])
  assert ptf.mean_spread([0.5, 0.7]) == f"0.600 +- {math.sqrt(0.02):.3f} (n=2)"
  assert ptf.mean_spread([0.5, None]) == "0.500 (n=1)" and ptf.mean_spread([]) == "-"
  assert ptf.format_seconds(59) == "59s" and ptf.format_seconds(125) == "2m05s"
  assert ptf.format_seconds(3700) == "1h01m"
  line = ptf.progress_line("pretrain", 300, 1500, "steps", 130.0, (100, 100.0))
  assert line == "[pretrain] 300/1500 steps (20%), 2.00 steps/s, elapsed 2m10s, ETA 10m00s"
  assert ptf.progress_line("x", 5, 10, "steps", 3.0, None).endswith("ETA ?")
  assert ptf.tuple_run("gdes_s12") == ("gdes", 12)


def test_mlm_mode_pretrains_with_the_mlm_objective_and_fine_tunes_its_export(ptf, tmp_path):
  args = ptf.parse_args([f"--workdir={tmp_path}", "--study=sharing", "--modes=mlm,gdes", "--seeds=0"])
  bench = ptf.Benchmark(args)
  mlm, gdes = bench.pretrain_command("mlm", 0), bench.pretrain_command("gdes", 0)
  assert "--config.objective=mlm" in mlm and not any("embedding_sharing" in a for a in mlm)
  assert "--config.rtd.embedding_sharing=gdes" in gdes and not any("objective" in a for a in gdes)
  init = lambda command: next(a for a in command if a.startswith("--config.init_from="))
  assert init(bench.finetune_command("mlm_s0", "rte")).endswith(os.path.join("mlm_s0", "export", "mlm"))
  assert init(bench.finetune_command("gdes_s0", "rte")).endswith(os.path.join("gdes_s0", "export", "discriminator"))
  # A killed run resumes only as the same mode: an MLM run's config.json does not pass for an RTD mode.
  directory = bench.pretrain_dir("gdes_s0")
  os.makedirs(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump({"objective": "mlm", "rtd": {"embedding_sharing": "gdes"}, "seed": 0,
               "train": {"steps": args.pretrain_steps}, "data": {"source": bench.corpus}}, f)
  with pytest.raises(ptf.StageMismatch, match="'mode': 'mlm'"):
    bench._check_pretrain_config(directory, "gdes", 0)
  bench._check_pretrain_config(directory, "mlm", 0)
  # The fine-tuned model's embedding cosine: E_D for RTD runs, the MLM model's E for mlm runs.
  assert ptf.fine_tuned_cosine({"cosine_E_G": 0.4, "cosine_E_D": 0.3}) == 0.3
  assert ptf.fine_tuned_cosine({"cosine_E": 0.2}) == 0.2
