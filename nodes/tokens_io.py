"""Save / Load semantic tokens: reuse one AR run across sessions, share token grids."""

from __future__ import annotations

import os

from .api import io

import folder_paths

from ..glm_image_core.generation.tokens import TOKEN_FILE_SUFFIX, GLMTokens, TokenFileError, load_tokens, save_tokens
from .types import CATEGORY, GlmTokens


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def token_files() -> list[str]:
    """Token files under ComfyUI's input folder (relative paths)."""
    root = folder_paths.get_input_directory()
    found = []
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(TOKEN_FILE_SUFFIX):
                found.append(os.path.relpath(os.path.join(d, f), root).replace(os.sep, "/"))
    return sorted(found)


def resolve_input_token_file(name: str) -> str:
    root = folder_paths.get_input_directory()
    if not name or os.path.isabs(name) or "\x00" in name:
        raise TokenFileError(f"token file name {name!r} must be a relative path inside ComfyUI's input folder")
    path = os.path.join(root, name)
    if not _inside(path, root):
        raise TokenFileError(f"token file {name!r} is outside ComfyUI's input folder; refused")
    if not os.path.isfile(path):
        raise TokenFileError(f"token file {name!r} not found in ComfyUI's input folder ({root})")
    return path


class GLMImageSaveTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageSaveTokens",
            display_name="GLM-Image Save Tokens",
            category=CATEGORY,
            description=f"Saves semantic tokens to ComfyUI's output folder as <prefix>_NNNNN_{TOKEN_FILE_SUFFIX} "
                        "(safetensors ids + JSON metadata). Copy the file to the input folder to load it.",
            inputs=[
                GlmTokens.Input("tokens"),
                io.String.Input("filename_prefix", default="glm_tokens/tokens",
                                tooltip="Path prefix inside the output folder."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix=None) -> bool | str:
        if not isinstance(filename_prefix, str):     # linked: checked when it runs
            return True
        out_dir = folder_paths.get_output_directory()
        if os.path.isabs(filename_prefix) or "\x00" in filename_prefix or \
                not _inside(os.path.join(out_dir, filename_prefix), out_dir):
            return (f"filename_prefix {filename_prefix!r} must be a relative path inside ComfyUI's output "
                    "folder; refused")
        return True

    @classmethod
    def execute(cls, tokens: GLMTokens, filename_prefix: str) -> io.NodeOutput:
        out_dir = folder_paths.get_output_directory()
        full_dir, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        if not _inside(full_dir, out_dir):
            raise TokenFileError(f"filename_prefix {filename_prefix!r} leaves ComfyUI's output folder; refused")
        file = f"{name}_{counter:05}_{TOKEN_FILE_SUFFIX}"
        save_tokens(tokens, os.path.join(full_dir, file))
        return io.NodeOutput(ui={"tokens": [{"filename": file, "subfolder": subfolder, "type": "output"}]})


class GLMImageLoadTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GLMImageLoadTokens",
            display_name="GLM-Image Load Tokens",
            category=CATEGORY,
            description=f"Loads semantic tokens ({TOKEN_FILE_SUFFIX}) from ComfyUI's input folder.",
            inputs=[io.Combo.Input("token_file", options=token_files(),
                                   tooltip="A token file in ComfyUI's input folder.")],
            outputs=[GlmTokens.Output("tokens", display_name="tokens")],
        )

    @classmethod
    def validate_inputs(cls, token_file) -> bool | str:
        try:
            resolve_input_token_file(token_file)
        except TokenFileError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, token_file):
        try:
            st = os.stat(resolve_input_token_file(token_file))
        except (TokenFileError, OSError):
            return float("nan")
        return (token_file, st.st_size, st.st_mtime_ns)

    @classmethod
    def execute(cls, token_file) -> io.NodeOutput:
        return io.NodeOutput(load_tokens(resolve_input_token_file(token_file)))
