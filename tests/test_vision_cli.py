"""launch/generate.py with images: a converted Mistral3 checkpoint reproduces transformers'
greedy tokens from image files (raw --prompt_ids with [IMG] placeholders), on one device
and on a mesh; bad images and placeholder counts fail clearly."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from smallfour.checkpoint import convert as convert_lib
from smallfour.nn import multimodal
from tests import checkpoints, launch_many, oracle, vision_oracle


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A float32 checkpoint converted from the multimodal oracle's disk layout, two image
  files (one beyond the 64-px longest edge, one not a multiple of the 8-px token)."""
  tmp = tmp_path_factory.mktemp("vision_cli")
  config = vision_oracle.hf_config(text=dict(num_hidden_layers=2, eos_token_id=255))
  hf = vision_oracle.hf_model(config, seed=9)
  checkpoints.write_mistral3_disk(str(tmp / "hf"), config, oracle.state_dict_numpy(hf))
  convert_lib.convert(str(tmp / "hf"), str(tmp / "ckpt"), dtype="float32", progress=False)
  rng = np.random.default_rng(0)
  paths = []
  for name, (h, w) in (("wide.png", (30, 100)), ("odd.png", (21, 13))):
    y, x = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    pixels = np.stack([np.sin(4 * x + y), np.cos(3 * y), x * y], -1) * 100 + 128
    pixels += rng.normal(0, 8, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(tmp / name)
    paths.append(tmp / name)
  return tmp / "ckpt", hf, paths


MESHES = ["data:1,expert:1,tensor:1", "data:1,expert:4,tensor:2"]
RAW = [1, 5, 10, 9, 200, 10, 17, 3]  # each 10 ([IMG]) stands for one --image


@pytest.mark.parametrize("mesh", MESHES)
def test_images_reproduce_transformers(runs, converted, mesh):
  _, hf, paths = converted
  raw = RAW
  outs, tmp = runs
  out = outs[f"reproduce {mesh}"]
  assert out.returncode == 0, out.stderr
  result = json.loads((tmp / f"reproduce{MESHES.index(mesh)}.json").read_text())
  processor = PixtralImageProcessorPil(patch_size={"height": 8, "width": 8},
                                       size={"longest_edge": 64})
  batch = processor(images=[Image.open(p) for p in paths], return_tensors="pt")
  layouts = [multimodal.image_tokens(h // 8, w // 8, vision_oracle.our_config(hf.config).vision)
             for h, w in batch["image_sizes"].tolist()]
  prompt = raw[:2] + layouts[0] + raw[3:5] + layouts[1] + raw[6:]
  assert result["prompt_ids"] == prompt
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor([prompt]), pixel_values=batch["pixel_values"],
                      image_sizes=batch["image_sizes"], max_new_tokens=12, do_sample=False,
                      eos_token_id=255, pad_token_id=0,
                      attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  ref = ref[0, len(prompt):].tolist()
  with torch.no_grad():
    forced = hf(input_ids=torch.tensor([prompt + ref[:-1]]), pixel_values=batch["pixel_values"],
                image_sizes=batch["image_sizes"]).logits[0, len(prompt) - 1:].numpy()
  oracle.assert_clear_winners(forced, ref)
  assert result["token_ids"] == ref


PLACEHOLDERS = [
    (["--prompt_ids=1,10,10,5"], r"the prompt has 2 \[IMG\] placeholder\(s\) \(id 10\) for 1"),
    (["--prompt_ids=1,5"], r"the prompt has 0 \[IMG\] placeholder\(s\) \(id 10\) for 1"),
]
BAD_IMAGES = [("{tmp}/junk.png", "junk.png: not a decodable image"),
              ("{tmp}/none.png", "none.png: cannot read"),
              ("http://example.com/a.png", "is a network URL")]


@pytest.fixture(scope="module")
def runs(converted, tmp_path_factory):
  """The checkpoint reproducing transformers on one device and on a mesh, the refusals
  and the tiny preset's image chat, in one interpreter (tests/launch_many.py): one start
  instead of nine."""
  ckpt, _, paths = converted
  tmp = tmp_path_factory.mktemp("vision_cli_runs")
  (tmp / "junk.png").write_bytes(b"not a png")
  cases = {f"reproduce {mesh}": [
      f"--ckpt={ckpt}", "--prompt_ids=" + ",".join(map(str, RAW)),
      *(f"--image={p}" for p in paths), "--max_new_tokens=12",
      f"--output_json={tmp / f'reproduce{i}.json'}", f"--mesh={mesh}"]
      for i, mesh in enumerate(MESHES)}
  cases |= {f"placeholders {i}": [f"--ckpt={ckpt}", *flags, f"--image={paths[0]}",
                                 "--max_new_tokens=2"]
           for i, (flags, _) in enumerate(PLACEHOLDERS)}
  cases.update({f"bad image {i}": [f"--ckpt={ckpt}", "--prompt_ids=1,10",
                                   f"--image={path.format(tmp=tmp)}", "--max_new_tokens=2"]
                for i, (path, _) in enumerate(BAD_IMAGES)})
  chat = ["--config=tiny", "--prompt=What is this?", f"--image={paths[0]}"]
  cases["chat dry run"] = [*chat, "--dry_run"]
  cases["chat"] = [*chat, "--max_new_tokens=3", f"--output_json={tmp / 'o.json'}"]
  outs = dict(zip(cases, launch_many.run("generate.py", cases.values()), strict=True))
  return outs, tmp


@pytest.mark.parametrize("i", range(len(PLACEHOLDERS)), ids=["two", "none"])
def test_placeholders_must_pair_with_images(runs, i):
  out, message = runs[0][f"placeholders {i}"], PLACEHOLDERS[i][1]
  assert out.returncode != 0
  assert "error: bad prompt:" in out.stderr and re.search(message, out.stderr), out.stderr


def test_bad_image_files_name_the_file(runs):
  for i, (_, message) in enumerate(BAD_IMAGES):
    out = runs[0][f"bad image {i}"]
    assert out.returncode != 0 and message in out.stderr, out.stderr


def test_chat_with_an_image_on_the_tiny_preset(runs):
  """--prompt with --image: mistral-common lays the image before the text (v15), and the
  dry run shows it; a real run generates."""
  outs, tmp = runs
  out = outs["chat dry run"]
  assert out.returncode == 0, out.stderr
  assert "[INST][IMG]" in out.stdout and "[IMG_END]What is this?[/INST]" in out.stdout
  out = outs["chat"]
  assert out.returncode == 0, out.stderr
  assert len(json.loads((tmp / "o.json").read_text())["token_ids"]) >= 1
