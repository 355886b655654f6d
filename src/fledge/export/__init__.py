"""Files other tools load: transformers folders (hf.py), GGUF files for llama.cpp (gguf.py, with
names.py and gguf_vocab.py) with an Ollama Modelfile beside each (ollama.py), each checked against
the trained model (verify.py); `export` (run.py) does it all for a run, as `fledge export` does:

    from fledge.export import export
    result = export("runs/persona", "gguf", quant=["f16", "q4_k_m"])    # runs/persona/export/gguf/
    result.files, result.verifications

docs/export.md describes the files, the checks and their thresholds.
"""

from fledge.export.ollama import write_modelfile
from fledge.export.run import ExportResult, HFCheck, export, export_hf
from fledge.export.verify import Verification, verify_gguf

__all__ = ["ExportResult", "HFCheck", "Verification", "export", "export_hf", "verify_gguf", "write_modelfile"]
