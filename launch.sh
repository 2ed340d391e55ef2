#!/usr/bin/env bash
# Named presets: distill an AdaSDE predictor, sample, score. Edit freely.
#
#   bash launch.sh                 # the demo: digits model, 5 NFE, AdaSDE vs its best learned peer and 7 baselines, ~10 min on 2 CPU cores
#   bash launch.sh digits-nfe5     # retrain one shipped digits predictor in its exp/ folder (also digits-nfe3/7/9,
#                                  #   and the paper's form: digits-paper-nfe3/5)
#   bash launch.sh digits-flow     # the digits rectified-flow model: distill AdaSDE, sample, FID vs flow baselines
#   bash launch.sh cifar10         # the paper's recipes: train, sample 50k, FID (GPUs; also ffhq, imagenet64,
#                                  #   lsun_bedroom, imagenet256, lsun_bedroom_ldm, ms_coco, sdxl, sd3, flux)
#   bash launch.sh --help          # the presets this checkout can run
#
# GPUS=<n> sets the processes per run (torchrun); default 1.
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${1:-demo}
GPUS=${GPUS:-1}
run() { if [ "$GPUS" -gt 1 ]; then torchrun --standalone --nproc_per_node="$GPUS" "$@"; else python "$@"; fi; }

# The presets, in --help order. A preset named after a zoo model whose adapter is not built yet (models/zoo.py,
# `missing`) is not offered, and appears by itself once it is: add a preset here and as a case below.
PRESETS="demo digits-nfe3 digits-nfe5 digits-nfe7 digits-nfe9 digits-paper-nfe3 digits-paper-nfe5 digits-peers digits-flow cifar10 ffhq imagenet64 lsun_bedroom imagenet256
    lsun_bedroom_ldm ms_coco sdxl sd3 flux"
declare -A ABOUT=([demo]="(default) digits model, 5 NFE: distill AdaSDE, sample 10k with it, its best learned peer and 7 baselines, FID + RMSE table"
    [digits-nfe3]="retrain the shipped digits predictor at 3 NFE in its exp/ folder (also digits-nfe5|7|9)"
    [digits-peers]="retrain the shipped learned peers on digits in their exp/ folders: AMED, its plug-ins, EPD, EPD-Plugin, AdaSDE without gamma"
    [digits-paper-nfe3]="retrain the shipped paper-form digits predictor at 3 NFE in its exp/ folder (also digits-paper-nfe5)"
    [digits-flow]="rectified-flow digits model, 5 NFE on flow sigmas: distill AdaSDE, sample 2k with it and 4 flow baselines, FID"
    [cifar10]="the paper's recipe: train, sample 50k, FID (GPUs)" [ffhq]="the paper's recipe (GPUs)"
    [imagenet64]="the paper's recipe (GPUs)" [lsun_bedroom]="the paper's recipe (GPUs)"
    [imagenet256]="guided diffusion 256 with classifier guidance, lsun_bedroom's recipe (GPUs)"
    [lsun_bedroom_ldm]="latent diffusion LSUN Bedroom, lsun_bedroom's recipe (GPUs)"
    [ms_coco]="Stable Diffusion v1.5, CFG 7.5, FID-30k on the MS-COCO captions (GPUs)"
    [sdxl]="SDXL base 1.0 at 1024 px, CFG 5, the ms_coco recipe adapted, FID-30k on the MS-COCO captions (GPUs)"
    [sd3]="Stable Diffusion 3 Medium (rectified flow), CFG 7, ms_coco's recipe at 1024x1024 (GPUs)"
    [flux]="FLUX.1-dev (rectified flow), distilled guidance 3.5, ms_coco's recipe at 1024x1024 (GPUs)")
# "<preset>: <why not>" for each preset that cannot run here.
not_built=$(python -c 'import sys; from models.zoo import ZOO
for p in sys.argv[1:]:
    if p in ZOO and ZOO[p].missing: print(f"{p}: {ZOO[p].missing}")' $PRESETS)
offered() { ! printf '%s\n' "$not_built" | grep -q "^$1: "; }
usage() {
    printf 'Usage: bash launch.sh [PRESET]    (GPUS=<n>: processes per run, torchrun; default 1)\n\nPresets:\n'
    for p in $PRESETS; do
        case "$p" in digits-nfe[579] | digits-paper-nfe5) continue ;; esac
        if offered "$p"; then printf '  %-17s %s\n' "$p" "${ABOUT[$p]}"; fi
    done
}

# One step of a preset: a step that fails or is stopped (Ctrl-C, SIGTERM: exit 130/143) ends the preset, with
# one line saying so; its own error is above that line. Every train.py here runs with --resume, so running the
# preset again continues a stopped run (and reuses a finished one: delete it from exps/ to start over). A preset
# that reproduces a shipped run (--outdir=exp) retrains it in its own folder, replacing its log and predictor
# (exp/ keeps no training state; train.py --resume says so), never into a new exp/<id>-... folder.
step() {  # label command...
    local label=$1 rc=0
    shift
    "$@" || rc=$?
    [ "$rc" -eq 0 ] || step_failed "$label" "$rc"
}
step_failed() {  # label exit-code
    if [ "$2" -eq 130 ] || [ "$2" -eq 143 ]; then
        echo "launch.sh: stopped during $1. To continue: bash launch.sh $PRESET (it resumes: train.py from its saved state, sample.py skips the images it has)" >&2
    else
        echo "launch.sh: $1 failed (exit code $2; its error is above). After fixing it: bash launch.sh $PRESET" >&2
    fi
    exit "$2"
}
header() { printf '\n=== %s\n' "$*"; }

case "$PRESET" in
-h|--help|help) usage; exit 0 ;;
esac
if printf ' %s ' $PRESETS | grep -q " $PRESET " && ! offered "$PRESET"; then
    echo "launch.sh: preset '$PRESET' cannot run yet: $(printf '%s\n' "$not_built" | grep "^$PRESET: " | cut -d' ' -f2-)" >&2
    exit 2
fi

# The settings of every AdaSDE recipe of the paper (the official AdaSDE launch scripts and README; docs/references.md).
ADASDE="--sampler_stu=adasde --sampler_tea=dpm --afs=True --scale_dir=0.05 --scale_time=0.2 --seed=0 --coslr"
UNIFORM="--schedule_type=time_uniform --schedule_rho=1"

# Train, then sample 50k images with the new predictor and score them.
paper_recipe() {  # dataset train-flags ref
    local dataset=$1 flags=$2 ref=$3
    header "1/4 train.py: distill an AdaSDE predictor for $dataset"
    step "train.py (step 1/3)" run train.py --dataset_name="$dataset" $ADASDE $UNIFORM $flags --resume
    local exp; exp=$(ls -d exps/*-"$dataset"-* | sort | tail -n 1)
    header "2/3 sample.py: 50k images with it"
    step "sample.py (step 2/3)" run sample.py --predictor_path="$exp" --batch=128 --seeds=0-49999 \
        --outdir="samples/$(basename "$exp")"
    header "3/3 fid.py: FID-50k against $ref (lower is better)"
    step "fid.py (step 3/3)" run fid.py calc --images="samples/$(basename "$exp")" --ref="$ref"
}

# The shipped digits predictors: AdaSDE's churn and scalings on the DEIS-tAB3 base (docs/adasde-multistep.md), one
# network call per step, trained by plain L2 to the DPM-Solver-2 teacher (on this model the feature loss made all
# three judges worse, docs/quality.md). exp/<id>-digits-<N>-<NFE>-adasde_deis-dpm-<M>-uni2.0-afs.
DIGITS_PLUGIN="--base=deis --feature_net=none --schedule_type=time_uniform --schedule_rho=2"
digits_predictor() {  # num_steps M [other train.py flags]
    step "train.py" python train.py --dataset_name=digits --outdir=exp --num_steps="$1" --M="$2" --gamma=0.02 \
        --lr=0.2 --batch=32 --total_kimg=10 $ADASDE $DIGITS_PLUGIN "${@:3}" --resume
}
# The paper's single-step form for comparison (bench/quality.py reports both forms): its recipe as published,
# with the digits loss network (not the FID detector) on the last step.
# exp/<id>-digits-<N>-<NFE>-adasde-dpm-3-uni1.0-afs.
digits_paper_predictor() {  # num_steps
    step "train.py" python train.py --dataset_name=digits --outdir=exp --num_steps="$1" --M=3 --gamma=0.02 --lr=0.2 \
        --batch=32 --total_kimg=10 $ADASDE $UNIFORM --feature_net=digits_loss --resume
}

# The learned peers on the digits model (bench/quality.py compares them with AdaSDE and the training-free solvers,
# docs/quality.md): each reference's own recipe (its launch script, else its train.py defaults) with this model's
# budget, 5 kimg at batch 32, and the digits loss network (not the FID detector) where the recipe has a feature loss.
# The NFE are real network calls: AMED and its plug-ins make 2 per step; EPD (K = 2 points) 3 per step, so it
# reaches 3, 5 and 9 calls (N = 2, 3 with AFS, 4) but not 7.
PEER_TRAIN="--dataset_name=digits --outdir=exp --seed=0 --batch=32 --total_kimg=5 --resume"
AMED_RECIPE="--sampler_stu=amed --sampler_tea=heun --M=1 --schedule_type=time_uniform --schedule_rho=1 --scale_dir=0.01 --scale_time=0"
AMED_IPNDM="--sampler_stu=amed_ipndm --sampler_tea=ipndm --M=2 --max_order=4 --scale_dir=0.01 --scale_time=0.2"
AMED_DPMPP="--sampler_stu=dpmpp --sampler_tea=dpmpp --M=2 --max_order=3"
EPD_RECIPE="--sampler_stu=epd --sampler_tea=heun --M=3 --num_points=2 --schedule_type=time_uniform --schedule_rho=1 \
    --scale_dir=0.05 --scale_time=0.05 --lr=0.2 --coslr --alpha=10 --feature_net=digits_loss"
EPD_IPNDM="--sampler_stu=epd_ipndm --sampler_tea=dpm --M=3 --num_points=2 --max_order=3 --schedule_type=time_uniform \
    --schedule_rho=1 --scale_dir=0.05 --scale_time=0.2 --lr=0.2 --coslr --alpha=10 --feature_net=digits_loss"
peer_runs() {  # one line per run: num_steps afs train-flags
    for n in 3 4 5 6; do
        echo "$n True $AMED_RECIPE"
        echo "$n True --sampler_stu=euler"
        echo "$n True --sampler_stu=dpm"
        echo "$n True $AMED_IPNDM"
        echo "$n True $AMED_DPMPP"
    done
    for na in "2 False" "3 True" "4 False"; do
        echo "$na $EPD_RECIPE"
        echo "$na $EPD_IPNDM"
    done
    # AdaSDE without its churn (gamma = 0): the paper's form (as digits-paper-nfe3/5) and the plug-in form at 3 and
    # 5 NFE (as digits-nfe3/5; the shipped 7- and 9-NFE predictors already have gamma = 0).
    for n in 3 4; do
        echo "$n True $ADASDE $UNIFORM --M=3 --gamma=0 --lr=0.2 --feature_net=digits_loss --desc=-nogamma"
    done
    echo "5 True $ADASDE $DIGITS_PLUGIN --M=2 --gamma=0 --lr=0.2 --desc=-nogamma"
    echo "7 True $ADASDE $DIGITS_PLUGIN --M=1 --gamma=0 --lr=0.2 --desc=-nogamma"
}

case "$PRESET" in
demo)
    # 1) Distill a 5-NFE predictor (num_steps=7 with AFS, DEIS-tAB3 base) against the DPM-Solver-2 teacher; 5 kimg
    #    here to keep the demo short on 2 cores (the shipped exp/ predictors use 10).
    #    --desc/--resume: a stopped demo continues its own run (a finished one is reused; delete it to start over).
    start=$SECONDS
    ADASDE_DEMO_SETTING="learned, deis base, N=7, AFS"
    PEER=epd_ipndm PEER_RUN=exp/00012-digits-3-5-epd_ipndm-dpm-3-uni1.0-afs
    PEER_SETTING="learned, EPD-Plugin, K=2, N=3, AFS (EPD counts 3)"
    header "1/4 train.py: distill a 5-NFE AdaSDE predictor for the digits model (5 kimg; continues an earlier demo run)"
    step "train.py (step 1/4)" python train.py --dataset_name=digits --outdir=exps --num_steps=7 --M=1 --gamma=0.02 \
        --lr=0.2 --batch=32 --total_kimg=5 $ADASDE $DIGITS_PLUGIN --desc=-demo --resume
    exp=$(ls -d exps/*-digits-7-5-*-demo | sort | tail -n 1)
    # 2) 10k samples per solver at 5 NFE, on the same seeds. Each baseline in its best setting at 5 NFE on this
    #    model (order, AFS on or off) as measured by bench/quality.py (docs/quality.md).
    out=samples/demo
    common="--dataset_name=digits --seeds=0-9999 --batch=1000 --net_batch=1000"
    header "2/4 sample.py: 10k images per solver at 5 NFE, same seeds (skips the images an earlier run made)"
    step "sample.py adasde (step 2/4)" python sample.py $common --predictor_path="$exp" --outdir=$out/adasde --grid
    step "sample.py deis (step 2/4)" python sample.py $common --solver=deis --num_steps=7 --afs=True --outdir=$out/deis
    step "sample.py dpmpp (step 2/4)" python sample.py $common --solver=dpmpp --max_order=2 --num_steps=7 --afs=True \
        --outdir=$out/dpmpp
    step "sample.py unipc (step 2/4)" python sample.py $common --solver=unipc --num_steps=6 --outdir=$out/unipc
    step "sample.py ipndm (step 2/4)" python sample.py $common --solver=ipndm --num_steps=6 --outdir=$out/ipndm
    step "sample.py dpm (step 2/4)" python sample.py $common --solver=dpm --num_steps=4 --afs=True --outdir=$out/dpm
    step "sample.py euler (step 2/4)" python sample.py $common --solver=euler --num_steps=7 --afs=True \
        --outdir=$out/euler
    step "sample.py er_sde (step 2/4)" python sample.py $common --solver=er_sde --num_steps=6 --afs=True \
        --outdir=$out/er_sde
    # The best learned peer at 5 NFE on this model (bench/quality.py, docs/quality.md), from the predictor that
    # bash launch.sh digits-peers shipped in exp/ (not retrained here).
    step "sample.py $PEER (step 2/4)" python sample.py $common --predictor_path="$PEER_RUN" --outdir=$out/$PEER
    # 3) The converged sampler on the first 1000 seeds: the reference of the network-free judge.
    header "3/4 sample.py: the converged sampler (Heun, 100 NFE) on seeds 0-999, the reference of the RMSE column"
    step "sample.py heun (step 3/4)" python sample.py --dataset_name=digits --seeds=0-999 --batch=1000 \
        --net_batch=1000 --solver=heun --num_steps=51 --outdir=$out/converged
    # 4) FID of each against the digits reference statistics, and the RMSE to the converged images, in one table.
    #    fid.py's progress bars go to a file (shown with its error if a step fails), so that the table stays readable.
    header "4/4 fid.py: FID of each solver's 10k images, RMSE of its first 1000 to the converged images"
    errors=$(mktemp)
    trap 'rm -f "$errors"' EXIT
    declare -A setting=([adasde]="$ADASDE_DEMO_SETTING" [$PEER]="$PEER_SETTING" [deis]="tAB3, N=7, AFS" [dpmpp]="2M, N=7, AFS"
        [unipc]="bh2 order 3, N=6" [ipndm]="order 4, N=6" [dpm]="N=4, AFS" [euler]="N=7, AFS"
        [er_sde]="order 3, noise_fn 7, N=6, AFS")
    judge() {  # solver command...: $value = the command's last line; if it fails, its error and a stop
        local s=$1 rc=0
        shift
        value=$("$@" 2>"$errors" | tail -n 1) || rc=$?
        if [ "$rc" -ne 0 ]; then  # its messages, each on a line of its own after the progress bar
            sed -e 's/\r/\n/g' -e 's/\(.\)Error: /\1\nError: /' "$errors" >&2
            step_failed "fid.py $s (step 4/4)" "$rc"
        fi
    }
    printf '\n| solver | setting (5 NFE) | FID (10k) | RMSE to converged (1k) |\n|---|---|---|---|\n'
    for s in adasde $PEER deis dpmpp unipc ipndm dpm euler er_sde; do
        judge $s python fid.py calc --images=$out/$s --ref=src/digits/fid-ref.npz
        fid=$value
        judge $s python fid.py rmse --images=$out/$s --reference=$out/converged
        printf '| %s | %s | %s | %s |\n' "$s" "${setting[$s]}" "$fid" "$value"
    done
    printf '\nFID: the Frechet distance between features (the digits classifier) of 10k samples and of the 1797\n'
    printf 'training digits (src/digits/fid-ref.npz). Lower is better; a converged sampler (Heun, 100 NFE) scores 0.68\n'
    printf 'on this model, the floor of this column. The AdaSDE predictor was trained by L2 to its teacher, never\n'
    printf 'against this detector. %s is the best learned peer at 5 NFE (bench/quality.py), shipped in exp/ by\n' "$PEER"
    printf 'bash launch.sh digits-peers: its last step trains against digits_loss, another network. NFE are real\n'
    printf 'network calls (EPD evaluates its 2 points per step in one batched call). RMSE: per image, pixels in\n'
    printf '[0, 1], to the image the converged sampler makes from the same seed, averaged over seeds 0-999; it\n'
    printf 'needs no network (0 = converged). Training never draws these seeds. Every solver and NFE, with KID\n'
    printf 'too: docs/quality.md.\n'
    printf '\nDemo done in %d s; predictor in %s, images in %s/\n' $((SECONDS - start)) "$exp" "$out"
    printf 'Look at 64 AdaSDE samples: %s\n' "$out/adasde-grid.png"
    ;;
digits-peers)
    # Every learned peer at 3-9 NFE, each retrained in its exp/ folder (30 runs, a few minutes each on a CPU);
    # --resume reuses the runs this checkout finished.
    i=0
    total=$(peer_runs | wc -l)
    while read -r n afs flags; do
        i=$((i + 1))
        header "train.py ($i/$total): --num_steps=$n --afs=$afs $flags"
        step "train.py ($i/$total)" python train.py $PEER_TRAIN --num_steps="$n" --afs="$afs" $flags
    done < <(peer_runs) ;;
digits-flow)
    # The embedded rectified-flow model (docs/flow.md), offline in minutes: AdaSDE on the DEIS base (N=7, AFS: 5 NFE;
    # it starts at its base solver, so a short run is usable, docs/flow.md) distilled on flow sigmas (diffusers'
    # FlowMatchEuler grid), then 2k samples with it and with the flow
    # baselines users know at 5 NFE on the same grid and seeds, and the FID of each (digits detector, the same
    # reference statistics as the digits model). 1 kimg of training: a demonstration, not the shipped predictor.
    start=$SECONDS
    header "1/3 train.py: distill a 5-NFE AdaSDE predictor for digits_flow on flow sigmas (1 kimg)"
    step "train.py (step 1/3)" python train.py --dataset_name=digits_flow --outdir=exps --schedule_type=flow \
        --base=deis --num_steps=7 --M=1 --gamma=0.02 --lr=0.2 --batch=32 --total_kimg=1 $ADASDE --desc=-flow --resume
    exp=$(ls -d exps/*-digits_flow-7-5-*-flow | sort | tail -n 1)
    out=samples/digits-flow
    common="--dataset_name=digits_flow --seeds=0-1999 --batch=1000 --net_batch=1000"
    header "2/3 sample.py: 2k images per solver at 5 NFE, flow sigmas, same seeds"
    step "sample.py adasde (step 2/3)" python sample.py $common --predictor_path="$exp" --outdir=$out/adasde
    declare -A flow_solver=([euler]="--solver=euler --num_steps=6" [heun]="--solver=heun --num_steps=4 --afs=True"
        [dpmpp]="--solver=dpmpp --max_order=2 --num_steps=6" [unipc]="--solver=unipc --num_steps=6")
    for s in euler heun dpmpp unipc; do
        step "sample.py $s (step 2/3)" python sample.py $common ${flow_solver[$s]} --schedule_type=flow --outdir=$out/$s
    done
    header "3/3 fid.py: FID of each solver's 2k images (digits detector; lower is better)"
    printf '\n| solver (5 NFE, flow sigmas) | setting | FID (2k) |\n|---|---|---|\n'
    for s in adasde euler heun dpmpp unipc; do
        rc=0
        value=$(python fid.py calc --images=$out/$s --ref=digits_flow 2>/dev/null | tail -n 1) || rc=$?
        [ "$rc" -eq 0 ] || step_failed "fid.py $s (step 3/3)" "$rc"
        printf '| %s | %s | %s |\n' "$s" "${flow_solver[$s]:-learned, deis base, N=7, AFS, $exp}" "$value"
    done
    printf '\nEuler on flow sigmas is diffusers FlowMatchEuler (docs/flow.md). Done in %d s.\n' $((SECONDS - start)) ;;
digits-nfe3) digits_predictor 5 2 ;;
digits-nfe5) digits_predictor 7 1 ;;
# At 7 and 9 NFE without churn: even its floor (gamma_min) adds more noise than the solver's error (docs/quality.md);
# 5 kimg, since N = 9, 11 cost 3-4x N = 4 per sample on a CPU.
digits-nfe7) digits_predictor 9 1 --gamma=0 --total_kimg=5 ;;
digits-nfe9) digits_predictor 11 1 --gamma=0 --total_kimg=5 ;;
digits-paper-nfe3) digits_paper_predictor 3 ;;
digits-paper-nfe5) digits_paper_predictor 4 ;;
cifar10)
    paper_recipe cifar10 "--num_steps=4 --M=3 --gamma=0.02 --lr=0.2 --batch=64 --total_kimg=10" cifar10 ;;
ffhq)
    paper_recipe ffhq "--num_steps=4 --M=3 --gamma=0.02 --lr=0.1 --alpha=50 --batch=32 --total_kimg=10" ffhq ;;
imagenet64)
    paper_recipe imagenet64 "--num_steps=6 --M=3 --gamma=0.02 --lr=0.2 --alpha=50 --batch=32 --total_kimg=10" \
        imagenet64 ;;
lsun_bedroom)
    paper_recipe lsun_bedroom "--num_steps=4 --M=3 --gamma=0.02 --lr=0.2 --batch=32 --total_kimg=10" \
        src/lsun_bedroom/fid-ref.npz ;;
imagenet256)
    # Not in the paper's recipe table: the lsun_bedroom settings, with classifier guidance at the zoo's scale 1.0
    # (guided-diffusion's published sampling scale for this model; README "Models" says why).
    paper_recipe imagenet256 "--num_steps=4 --M=3 --gamma=0.02 --lr=0.2 --batch=32 --total_kimg=10 \
        --guidance_type=cg --guidance_rate=1.0" src/imagenet256/fid-ref.npz ;;
lsun_bedroom_ldm)
    # Not in the paper's recipe table: the lsun_bedroom settings on the VQ-f4 latents (feature loss through the
    # decoder).
    paper_recipe lsun_bedroom_ldm "--num_steps=4 --M=3 --gamma=0.02 --lr=0.2 --batch=32 --total_kimg=10" \
        src/lsun_bedroom_ldm/fid-ref.npz ;;
ms_coco)
    # Stable Diffusion v1.5, CFG 7.5, FID-30k on the MS-COCO captions (README recipe; see docs/sd.md).
    header "1/4 train.py: distill an AdaSDE predictor for Stable Diffusion v1.5"
    step "train.py (step 1/3)" run train.py --dataset_name=ms_coco --sampler_stu=adasde --sampler_tea=dpm --num_steps=4 --M=3 --afs=True \
        --scale_dir=0.05 --scale_time=0.2 --gamma=0.001 --seed=0 --lr=0.01 --schedule_type=discrete \
        --schedule_rho=1 --guidance_type=cfg --guidance_rate=7.5 --batch=32 --total_kimg=5 --resume
    exp=$(ls -d exps/*-ms_coco-* | sort | tail -n 1)
    header "2/3 sample.py: 30k images, one per MS-COCO caption"
    step "sample.py (step 2/3)" run sample.py --predictor_path="$exp" --batch=32 --seeds=0-29999 \
        --prompt=src/prompts/MS-COCO_val2014_30k_captions.csv --outdir="samples/$(basename "$exp")"
    header "3/3 fid.py: FID-30k against src/ms_coco/fid-ref.npz (lower is better)"
    step "fid.py (step 3/3)" run fid.py calc --images="samples/$(basename "$exp")" --ref=src/ms_coco/fid-ref.npz ;;
sdxl)
    # The ms_coco recipe (same DDPM table, so the same discrete schedule and NFE), adapted (docs/sd.md "SDXL"):
    # guidance 5 (SDXL's default scale), batch 16 in rounds of one sample per process (the 1024 px feature loss
    # backpropagates through the VAE decoder).
    header "1/3 train.py: distill an AdaSDE predictor for SDXL"
    step "train.py (step 1/3)" run train.py --dataset_name=sdxl --sampler_stu=adasde --sampler_tea=dpm --num_steps=4 --M=3 --afs=True \
        --scale_dir=0.05 --scale_time=0.2 --gamma=0.001 --seed=0 --lr=0.01 --schedule_type=discrete \
        --schedule_rho=1 --guidance_type=cfg --guidance_rate=5 --batch=16 --batch-gpu=1 --total_kimg=5 --resume
    exp=$(ls -d exps/*-sdxl-* | sort | tail -n 1)
    header "2/3 sample.py: 30k images at 1024 px, one per MS-COCO caption"
    step "sample.py (step 2/3)" run sample.py --predictor_path="$exp" --batch=8 --seeds=0-29999 \
        --prompt=src/prompts/MS-COCO_val2014_30k_captions.csv --outdir="samples/$(basename "$exp")"
    header "3/3 fid.py: FID-30k against src/sdxl/fid-ref.npz (lower is better)"
    step "fid.py (step 3/3)" run fid.py calc --images="samples/$(basename "$exp")" --ref=src/sdxl/fid-ref.npz ;;
sd3 | flux)
    # The ms_coco recipe (AdaSDE's SD v1.5 settings) on a rectified-flow transformer (docs/flow-pipelines.md): 4 time
    # points with AFS (5 network calls), the discrete schedule at rho 1, which on these models is uniform in their
    # unshifted flow time, i.e. the pipelines' own shifted schedule (as uniform-in-DDPM-index is SD's), gamma 0.001,
    # lr 0.01, 5 kimg. Guidance: each model's own default (SD3: CFG 7.0, 10 model evaluations; FLUX.1-dev: the
    # distilled scale 3.5, one evaluation per call). 1024x1024 images: --batch-gpu=2 bounds the memory of the
    # backpropagation through the transformer and the VAE decoder (not measured here: no GPU).
    guidance="--guidance_type=cfg --guidance_rate=7.0"
    [ "$PRESET" = flux ] && guidance="--guidance_type=distilled --guidance_rate=3.5"
    header "1/4 train.py: distill an AdaSDE predictor for $PRESET"
    step "train.py (step 1/3)" run train.py --dataset_name="$PRESET" --sampler_stu=adasde --sampler_tea=dpm --num_steps=4 \
        --M=3 --afs=True --scale_dir=0.05 --scale_time=0.2 --gamma=0.001 --seed=0 --lr=0.01 --schedule_type=discrete \
        --schedule_rho=1 $guidance --batch=32 --batch-gpu=2 --total_kimg=5 --resume
    exp=$(ls -d exps/*-"$PRESET"-* | sort | tail -n 1)
    header "2/3 sample.py: 30k images, one per MS-COCO caption"
    step "sample.py (step 2/3)" run sample.py --predictor_path="$exp" --batch=8 --seeds=0-29999 \
        --prompt=src/prompts/MS-COCO_val2014_30k_captions.csv --outdir="samples/$(basename "$exp")"
    header "3/3 fid.py: FID-30k against src/ms_coco/coco-val2014-1024.npz (lower is better)"
    step "fid.py (step 3/3)" run fid.py calc --images="samples/$(basename "$exp")" \
        --ref=src/ms_coco/coco-val2014-1024.npz ;;
*)
    echo "launch.sh: unknown preset '$PRESET'; bash launch.sh --help lists the presets" >&2
    exit 2 ;;
esac
