"""The reference's instruction templates (FoundationVision/Groma@cf01ed8, groma/data/datasets/*.py): the questions
its training samples ask, and its evaluations draw from. Training (:mod:`groma_core.training.datasets`) and
evaluation (:mod:`groma_core.evaluation.harness`) both read them here.

Verbatim: the released weights were trained on these strings, so they are kept character for character.
"""

# refcoco_rec.py:12-19 (the same list in grit.py:15-22); the REC eval, groma/eval/eval_rec.py:14,36, draws from it.
REC_INSTRUCTIONS = (
    "Locate {} in the image.",
    "Can you spot {} in the photograph?",
    "Identify where {} is located in the picture.",
    "Please detect {} in the picture.",
    "Which region matches the description {}?",
    "Please identify the object that corresponds to {}.",
)
# coco.py:12-19 (the same list in lvis.py:12-19); the LVIS-Ground eval, groma/eval/eval_lvis.py:16,69, draws from it.
GROUNDING_INSTRUCTIONS = (
    "Locate all {} in this image.",
    "Identify all instances of {} in the photo.",
    "Find all instances of {} in the image.",
    "Point out all the {} visible in this picture.",
    "Detect and list each {} that appears in this photo.",
    "What is the position of each {} in the image?",
)
# flickr.py:14-22 (asked after the [grounding] prefix).
CAPTION_INSTRUCTIONS = (
    "Give me a concise description of the image.",
    "Please briefly summarize the content of this image.",
    "What does this picture show? Please summarize briefly.",
    "Can you give me a quick overview of what's depicted in this image?",
    "Could you describe the key elements in this photograph?",
    "Offer a brief explanation of what this image represents.",
    "Sum up the contents of this picture in one or two sentences.",
)
# visual_genome.py:15-20; the VG region-caption eval, groma/eval/model_vg.py:14,43, draws from it.
REGION_INSTRUCTIONS = (
    "What is {}?",
    "Please briefly describe {}.",
    "Provide a short description for {}.",
    "Please give a concise description of region {}.",
)
# refcoco_cap.py:12-18; the RefCOCOg region-caption eval, groma/eval/model_refcocog.py:15,81, draws from it.
DETAILED_REGION_INSTRUCTIONS = (
    "Can you provide me with a detailed description of {}?",
    "Please describe {} in details.",
    "I'm curious about {} in the photo. Can you describe it in detail?",
    "Please give a comprehensive description of the object {}.",
    "What does the object {} in the picture look like? Could you give me a detailed description?",
)
