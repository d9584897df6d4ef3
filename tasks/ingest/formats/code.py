"""Source code: kept verbatim (whitespace is meaning), its language in `meta.language`."""

from __future__ import annotations

from collections.abc import Iterator

from refinery.tasks.ingest.base import Context, Format, Item, split_name, text_doc
from refinery.tasks.ingest.formats.text import decode_text

CODE_LANGUAGES: dict[str, str] = {
    ".py": "python", ".pyi": "python", ".ipynb": "jupyter", ".js": "javascript", ".mjs": "javascript",
    ".cjs": "javascript", ".jsx": "javascript", ".ts": "typescript", ".tsx": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "cpp", ".cpp": "cpp", ".cxx": "cpp", ".hpp": "cpp",
    ".hh": "cpp", ".cs": "csharp", ".go": "go", ".rs": "rust", ".rb": "ruby", ".php": "php",
    ".swift": "swift", ".kt": "kotlin", ".kts": "kotlin", ".scala": "scala", ".sh": "shell",
    ".bash": "shell", ".zsh": "shell", ".ps1": "powershell", ".sql": "sql", ".r": "r", ".lua": "lua",
    ".pl": "perl", ".pm": "perl", ".hs": "haskell", ".jl": "julia", ".m": "objective-c", ".mm": "objective-c",
    ".dart": "dart", ".ex": "elixir", ".exs": "elixir", ".erl": "erlang", ".clj": "clojure",
    ".ml": "ocaml", ".fs": "fsharp", ".f90": "fortran", ".zig": "zig", ".nim": "nim", ".v": "verilog",
    ".vhd": "vhdl", ".css": "css", ".scss": "scss", ".less": "less", ".vue": "vue", ".svelte": "svelte",
    ".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".ini": "ini", ".cfg": "ini", ".xml": "xml",
    ".proto": "protobuf", ".graphql": "graphql", ".tf": "hcl", ".groovy": "groovy", ".gradle": "groovy",
    ".cmake": "cmake", ".tex": "latex", ".asm": "assembly", ".s": "assembly", ".bat": "batch",
}
CODE_FILENAMES = {"dockerfile": "dockerfile", "makefile": "makefile", "cmakelists.txt": "cmake",
                  "gemfile": "ruby", "rakefile": "ruby", "jenkinsfile": "groovy"}


def read_code(name: str, data: bytes, ctx: Context) -> Iterator[Item]:
    base, ext = split_name(name)
    lang = CODE_FILENAMES.get(base) or CODE_LANGUAGES.get(ext, "unknown")
    text, enc = decode_text(data)
    yield text_doc(text, "code", len(data), {"language": lang, "encoding": enc}, "source file")


CODE = Format("code", read_code, extensions=CODE_LANGUAGES, filenames=CODE_FILENAMES)
