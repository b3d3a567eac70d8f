# Sourced by the demo scripts: set up the environment (tests/setup_env.sh) and write the embedded demo shards to
# demo_data/, from Fashion-MNIST when Debian's package is installed or installable, else scikit-learn's digits.
source tests/setup_env.sh
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  { apt-get install -y -qq dataset-fashion-mnist || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; }; } \
    >/dev/null 2>&1 || echo "dataset-fashion-mnist not installable: the demo uses scikit-learn's digits"
fi
"$PYTHON" -m pretrain.data demo --out demo_data --no-progress
