"""A stage added in a test, not shipped: adding a stage is one StageSpec entry plus its functions (issue 13).

"chosen_sft": supervised fine-tuning on the chosen responses of a preference file, its loss scaled by the section's
``loss_scale``. Everything the stage needs is below; ``register()`` puts the entry into the table, and the CLI, the
config (a ``chosen_sft:`` section) and the training loop pick it up from there.
"""

from dataclasses import dataclass

from allo_train import data as D
from allo_train.config import StageTrainingArgs
from allo_train.stages import STAGES, StageSpec, sft_loss


@dataclass
class ChosenSFTConfig(StageTrainingArgs):
    loss_scale: float = 1.0


def chosen_data(cfg, args, tokenizer, device):
    examples = D.load_sft_jsonl(args.data_path, completion_field="chosen")
    return D.tokenize_sft(examples, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length)


def scaled_sft_loss(args, out):
    loss, metrics = sft_loss(args, out)
    return args.loss_scale * loss, metrics


CHOSEN_SFT = StageSpec(
    name="chosen_sft",
    section=ChosenSFTConfig,
    summary="SFT on the chosen responses of a preference file",
    data=chosen_data,
    collator=D.SFTCollator,
    loss=scaled_sft_loss,
    starts_from=("sft",),
)


def register(table: dict = STAGES) -> None:
    table[CHOSEN_SFT.name] = CHOSEN_SFT
