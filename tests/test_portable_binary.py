"""One module for every x86-64 CPU: the CPU kernels are compiled per instruction set and
chosen at import; no code that needs more than the baseline runs outside the builds
that need it (which would crash an older CPU with an illegal instruction)."""

import collections
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys

import pytest

from unmask import native
from tests.helpers import requires_extension

pytestmark = requires_extension

# Instructions beyond the x86-64 baseline (SSE2) that GCC or Clang emit for -march levels
# up to x86-64-v4 in scalar or SSE form. tzcnt is not listed: it is encoded as `rep bsf`,
# which every x86-64 CPU runs (GCC emits it for baseline code on purpose).
SCALAR_EXTENSIONS = {
    "popcnt", "lzcnt", "andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext", "rorx", "sarx",
    "shlx", "shrx", "movbe", "crc32", "pshufb", "ptest", "pmulld", "roundps", "roundss", "roundsd", "blendvps",
    "pblendvb", "pminsd", "pmaxsd", "pextrd", "pextrq", "pinsrd", "pinsrq", "insertps", "pcmpeqq", "pcmpgtq",
    "packusdw", "lddqu", "movddup", "haddps", "phaddd",
}


def beyond_baseline(mnemonic: str, line: str) -> bool:
    vector = mnemonic.startswith("v") and mnemonic not in ("verr", "verw")  # VEX / EVEX encodings
    return vector or mnemonic in SCALAR_EXTENSIONS or "%ymm" in line or "%zmm" in line


def needs_avx512(line: str) -> bool:
    return "%zmm" in line or re.search(r"%k[0-7]", line) is not None or re.search(r"%[xy]mm(1[6-9]|2\d|3[01])\b",
                                                                                    line) is not None


# AMX (tile) and AVX512-BF16 instructions: Sapphire Rapids and later only.
AMX_AND_BF16 = {"ldtilecfg", "sttilecfg", "tilezero", "tileloadd", "tileloaddt1", "tilestored", "tilerelease",
                "tdpbf16ps", "vcvtne2ps2bf16", "vcvtneps2bf16", "vdpbf16ps"}


def functions_beyond_baseline(path: str) -> tuple[dict[str, set[str]], set[str]]:
    """{function: its instructions beyond the baseline} and the functions using AVX-512."""
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", path], capture_output=True, text=True,
                          check=True).stdout
    beyond, avx512 = collections.defaultdict(set), set()
    function = None
    for line in text.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not fields[1].split():
            continue
        mnemonic = fields[1].split()[0]
        if beyond_baseline(mnemonic, line) or mnemonic in AMX_AND_BF16:
            beyond[function].add(mnemonic)
        if needs_avx512(line):
            avx512.add(function)
    return beyond, avx512


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 instruction sets")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_vector_code_lives_only_in_the_instruction_set_builds():
    if native.cpu_isas() == ["native"]:
        pytest.skip("a -march=native build (UNMASK_NATIVE_ARCH=ON) runs only where it was built")
    assert native.cpu_isas() == ["amx", "avx512", "avx2", "portable"]
    beyond, avx512 = functions_beyond_baseline(native._C.__file__)
    # The kernels live in unmask::cpu::<isa>, the inline helpers of shared headers in
    # unmask::<isa>. A compiler clone ("[clone .isra.0]" of std::sort, say) is local to the
    # translation unit that made it, so only its own build calls it. (The symbol table
    # cannot tell the rest apart: hidden inline functions merged across builds are local
    # in the linked module too.)
    owned = {name for name in beyond if re.search(r"\bunmask::(cpu::)?(avx2|avx512|amx)::", name) or "[clone ." in name}
    strays = {name: sorted(beyond[name]) for name in beyond if name not in owned}
    assert not strays, f"code beyond x86-64 outside unmask::cpu::avx2 / avx512 / amx: {strays}"
    for isa in ("amx", "avx512", "avx2"):
        assert any(f"::{isa}::" in name for name in owned), f"the scan must see the {isa} build"
    avx512_outside = sorted(name for name in avx512 if not re.search(r"\bunmask::(cpu::)?(avx512|amx)::", name))
    assert not avx512_outside, f"AVX-512 code outside unmask::cpu::avx512 / amx: {avx512_outside[:5]}"
    amx_outside = sorted(name for name in beyond if beyond[name] & AMX_AND_BF16
                         and not re.search(r"\bunmask::(cpu::)?amx::", name))
    assert not amx_outside, f"AMX or AVX512-BF16 code outside unmask::cpu::amx: {amx_outside[:5]}"
    assert any(beyond[name] & {"tdpbf16ps"} for name in owned), "the amx build multiplies on tiles"


def _import_with(isa: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from unmask import native; print(native.cpu_isa())"],
                          capture_output=True, text=True, env={**os.environ, "UNMASK_ISA": isa})


@pytest.mark.parametrize("isa", native.runnable_cpu_isas())
def test_unmask_isa_picks_the_build(isa):
    result = _import_with(isa)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == isa


def test_unmask_isa_names_the_choices_when_it_cannot():
    result = _import_with("avx1024")
    assert result.returncode != 0
    choices = ", ".join(native.runnable_cpu_isas())
    assert f"UNMASK_ISA=avx1024: isa avx1024 is not available: this module and CPU run {choices}" in result.stderr


def test_use_cpu_isa_switches_and_refuses_unknown_names():
    best = native.cpu_isa()
    with native.cpu_isa_forced("portable"):
        assert native.cpu_isa() == "portable"
    assert native.cpu_isa() == best
    with pytest.raises(ValueError, match="isa sse9 is not available"):
        native.use_cpu_isa("sse9")


def test_the_best_runnable_build_is_chosen_at_import():
    result = _import_with("")
    assert result.stdout.strip() == native.runnable_cpu_isas()[0]


@pytest.mark.skipif(not native.available(), reason="unmask._C not built")
def test_the_cpu_vendor_is_the_one_linux_reports():
    """The routing rules read CPUID's vendor string (unmask.sdpa: torch's own kernels take
    other paths on AMD); on Linux /proc/cpuinfo names the same one."""
    vendor = native.cpu_vendor()
    assert isinstance(vendor, str)
    if platform.machine() not in ("x86_64", "AMD64"):
        assert vendor == ""
        return
    assert vendor in ("GenuineIntel", "AuthenticAMD") or len(vendor) == 12
    cpuinfo = pathlib.Path("/proc/cpuinfo")
    if cpuinfo.exists():
        reported = re.search(r"^vendor_id\s*:\s*(\S+)", cpuinfo.read_text(), re.MULTILINE)
        assert reported is not None and reported.group(1) == vendor
