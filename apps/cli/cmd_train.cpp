// `streamdiffusion train`: trains the tiny emoji text-to-image model (tiny TAESD + CLIP text encoder with its own
// BPE vocabulary + UNet) from the emoji-datasource npm packages and writes it as a diffusers folder
// (models/emoji-tiny). Resumes from <work-dir>/checkpoint.safetensors; deterministic for a seed and thread count.
#include <chrono>
#include <filesystem>
#include <iostream>

#include "apps/cli/commands.h"
#include "core/device.h"
#include "core/error.h"
#include "core/text.h"
#include "train/emoji_trainer.h"

namespace {

struct TrainCliOptions {
  std::string data, out = "models/emoji-tiny", work_dir = "emoji-train", styles = "google";
  int64_t limit = 0;
  int threads = 0;
  std::string weights_dtype = "fp32";
  bool no_resume = false;
  sd::train::TrainOptions t;
};

sd::cli::Runner setup_train(CLI::App& app) {
  auto o = std::make_shared<TrainCliOptions>();
  o->t.probe_every = 500;
  app.add_option("--data", o->data,
                 "emoji cache folder holding node_modules/emoji-datasource-* (default: $SD_EMOJI_DATA or "
                 "~/.cache/streamdiffusion/emoji; scripts/fetch-emoji-data.sh installs it)");
  app.add_option("--styles", o->styles, "emoji-datasource styles to train on (google = default style)")
      ->capture_default_str();
  app.add_option("--out", o->out, "model folder to write (diffusers layout)")->capture_default_str();
  app.add_option("--work-dir", o->work_dir, "checkpoint and tokenizer folder (resumed from when present)")
      ->capture_default_str();
  app.add_option("--seed", o->t.seed, "random seed")->capture_default_str();
  app.add_option("--ae-steps", o->t.ae_steps, "autoencoder steps")->capture_default_str();
  app.add_option("--unet-steps", o->t.unet_steps, "UNet + text encoder steps")->capture_default_str();
  app.add_option("--ae-batch", o->t.ae_batch, "autoencoder batch size")->capture_default_str();
  app.add_option("--batch", o->t.batch, "UNet batch size")->capture_default_str();
  app.add_option("--ae-lr", o->t.ae_lr, "autoencoder learning rate (AdamW, warm-up then cosine)")->capture_default_str();
  app.add_option("--ae-loss", o->t.ae_loss, "autoencoder loss: edge (L1 + L2 + gradient L1) | l2l1 (L2 + 0.5 L1)")
      ->capture_default_str();
  app.add_option("--ae-grad-weight", o->t.ae_grad_weight, "weight of the gradient term of the edge loss")
      ->capture_default_str();
  app.add_option("--ae-channels", o->t.ae_channels,
                 "channels of every autoencoder stage, encoder and decoder (0 = the recipe's: " +
                     std::to_string(sd::train::emoji_taesd_config()["decoder_block_out_channels"][0].get<int64_t>()) +
                     ")")
      ->capture_default_str();
  app.add_option("--lr", o->t.lr, "UNet + text encoder learning rate")->capture_default_str();
  app.add_option("--bpe-merges", o->t.bpe.max_merges, "maximum BPE merges of the learned vocabulary")
      ->capture_default_str();
  app.add_option("--limit", o->limit, "use only the first N emoji per style (quick runs)")->capture_default_str();
  app.add_option("--checkpoint-every", o->t.checkpoint_every, "steps between checkpoints")->capture_default_str();
  app.add_option("--log-every", o->t.log_every, "steps between progress lines")->capture_default_str();
  app.add_option("--stop-after", o->t.stop_after, "stop after N steps of this run (resume later)");
  app.add_option("--threads", o->threads, "libtorch threads (0 = all cores)")
      ->check(CLI::Range(0, 1024))  // more is a typo that would hang the command making threads
      ->capture_default_str();
  app.add_option("--weights-dtype", o->weights_dtype, "dtype of the written weights: fp32 | fp16 | bf16")
      ->capture_default_str();
  app.add_flag("--no-resume", o->no_resume, "ignore an existing checkpoint in --work-dir");
  app.add_option("--train-text-encoder", o->t.train_text_encoder,
                 "train the text encoder jointly with the UNet (false: frozen at its seeded random init)")
      ->capture_default_str();
  app.add_option("--canonical-prob", o->t.canonical_prob,
                 "probability of training on the emoji's name itself rather than any caption variant")
      ->capture_default_str();
  app.add_option("--probe-every", o->t.probe_every,
                 "log the 1-step prompt adherence on 50 emoji every N UNet steps and at the end (0 = never)")
      ->capture_default_str();
  app.add_option("--latent-std", o->t.latent_std,
                 "standard deviation of the scaled latents the UNet is trained on (sets the TAESD scaling_factor)")
      ->capture_default_str();
  app.add_option("--terminal-pure-noise", o->t.terminal_pure_noise,
                 "at t = 999 train on pure noise, as the stream's first step sees it (true | false)")
      ->capture_default_str();
  app.add_option("--max-loss-weight", o->t.max_loss_weight, "cap of the x0-space loss weight (1 - a) / a")
      ->capture_default_str();
  return [o] {
    sd::set_threads(o->threads);
    const auto dtype = sd::parse_dtype(o->weights_dtype);
    // Checked before the dataset loads, so a typo fails at once.
    if (o->t.ae_channels < 0)
      throw sd::InvalidArgument("--ae-channels must be >= 1 (or 0 for the recipe's), got " +
                                std::to_string(o->t.ae_channels));
    const std::string data = o->data.empty() ? sd::train::default_emoji_data_dir() : o->data;
    const auto styles = sd::split(o->styles, ',');
    const auto t0 = std::chrono::steady_clock::now();
    auto ds = std::make_shared<sd::train::EmojiDataset>(
        sd::train::load_emoji_dataset(data, styles, 64, o->limit));
    std::cerr << "train: " << ds->size() << " images (" << o->styles << ") from " << data << " in "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s\n";
    o->t.work_dir = o->work_dir;
    o->t.resume = !o->no_resume;
    sd::train::EmojiTrainer trainer(o->t, ds);
    std::cerr << "train: tokenizer vocabulary " << trainer.tokenizer().vocab_size() << " tokens\n";
    const auto st = trainer.run();
    if (trainer.step() < o->t.ae_steps + o->t.unet_steps) {
      std::cout << "stopped at step " << trainer.step() << " (resume with the same command)\n";
      return 0;
    }
    trainer.export_model(o->out, dtype);
    std::cout << "trained " << st.step << " steps in " << st.seconds << " s (this run); autoencoder loss "
              << st.ae_loss << ", unet loss " << st.unet_loss << "; latent scaling factor "
              << trainer.latent_scaling_factor() << "; wrote " << o->out << "\n";
    return 0;
  };
}

REGISTER_COMMAND("train", "train the tiny emoji text-to-image model (models/emoji-tiny) from emoji images", 80,
                 setup_train);

}  // namespace
