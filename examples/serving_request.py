"""Build a TF Serving REST request for an exported model and check the response format.

TF Serving's REST API (row format): ``POST /v1/models/<name>:predict`` with
``{"instances": [...]}``, one entry per example: the input's value for a
one-input model, ``{input_name: value}`` for several inputs. It answers
``{"predictions": [...]}``: per example the output's value for a one-output
model, ``{output_name: value}`` for several outputs.

This script reads the ``serving_default`` signature of a SavedModel written
by ``keras_gradops.serving.export_for_serving``, builds the request body (from
an ``.npz`` of named inputs, or random inputs of the right shape), writes it
as JSON, computes the response TF Serving must give by running the SavedModel
locally, and, given ``--server``, posts the request to a running TF Serving
and checks its answer against that local response::

    python examples/quickstart.py   # exports saved_models/digits_mlp/1
    python examples/serving_request.py saved_models/digits_mlp/1 --num-instances 2
    docker run -p 8501:8501 -v "$PWD/saved_models/digits_mlp:/models/digits_mlp" \\
        -e MODEL_NAME=digits_mlp tensorflow/serving &
    python examples/serving_request.py saved_models/digits_mlp/1 --server http://localhost:8501
    # or by hand: curl -X POST -d @runs/serving_request/request.json \\
    #     http://localhost:8501/v1/models/digits_mlp:predict
"""

import argparse
import json
import os
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def predict_request(inputs):
    """The row-format request body for named input batches.

    Args:
        inputs: ``{input_name: array}``, every array with the same first (batch) size.

    Returns:
        ``{"instances": [...]}``, JSON-serializable.
    """
    sizes = {name: len(value) for name, value in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`inputs` must share one batch size. Received sizes: {sizes}")
    lists = {name: np.asarray(value).tolist() for name, value in inputs.items()}
    if len(lists) == 1:
        (rows,) = lists.values()
        return {"instances": rows}
    return {"instances": [dict(zip(lists, row)) for row in zip(*lists.values())]}


def expected_response(outputs):
    """The row-format response TF Serving returns for named output batches.

    Args:
        outputs: ``{output_name: array}`` from the ``serving_default`` signature.

    Returns:
        ``{"predictions": [...]}``.
    """
    lists = {name: np.asarray(value).tolist() for name, value in outputs.items()}
    if len(lists) == 1:
        (rows,) = lists.values()
        return {"predictions": rows}
    return {"predictions": [dict(zip(lists, row)) for row in zip(*lists.values())]}


def check_response(response, expected, rtol=1e-4, atol=1e-5):
    """Raises ValueError unless ``response`` has ``expected``'s structure and close values."""
    if not isinstance(response, dict) or set(response) != {"predictions"}:
        keys = sorted(response) if isinstance(response, dict) else type(response).__name__
        raise ValueError(f"A predict response must be {{'predictions': [...]}}. Received keys: {keys}")
    predictions, wanted = response["predictions"], expected["predictions"]
    if len(predictions) != len(wanted):
        raise ValueError(f"Expected {len(wanted)} predictions, received {len(predictions)}.")
    for index, (got, want) in enumerate(zip(predictions, wanted)):
        if isinstance(want, dict) != isinstance(got, dict) or (isinstance(want, dict) and set(got) != set(want)):
            raise ValueError(f"Prediction {index} has the wrong structure: {got!r:.80} for {want!r:.80}")
        pairs = [(got[k], want[k]) for k in want] if isinstance(want, dict) else [(got, want)]
        for got_value, want_value in pairs:
            if np.shape(got_value) != np.shape(want_value) or not np.allclose(got_value, want_value, rtol, atol):
                raise ValueError(f"Prediction {index} differs from the local SavedModel's.")


def serving_signature(path):
    """The ``serving_default`` function of the SavedModel at ``path``."""
    return tf.saved_model.load(path).signatures["serving_default"]


def example_inputs(signature, num_instances, seed=0):
    """Uniform random inputs in [0, 1) shaped like the signature's, batch ``num_instances``."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, spec in signature.structured_input_signature[1].items():
        if spec.dtype == tf.string or None in spec.shape[1:]:
            raise ValueError(f"Input {name!r} ({spec}) needs real values: pass --inputs FILE.npz.")
        values = rng.uniform(size=(num_instances,) + tuple(spec.shape[1:]))
        inputs[name] = values.astype(spec.dtype.as_numpy_dtype)
    return inputs


def post(url, body, timeout=30):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        return json.loads(answer.read())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model", help="a version directory, e.g. saved_models/digits_mlp/1")
    parser.add_argument("--inputs", help="an .npz whose keys are the signature's input names")
    parser.add_argument("--num-instances", type=int, default=2, help="random instances without --inputs")
    parser.add_argument("--server", help="TF Serving REST address, e.g. http://localhost:8501")
    parser.add_argument("--model-name", help="served name (default: the version directory's parent)")
    parser.add_argument("--out-dir", default=os.path.join(REPO_ROOT, "runs", "serving_request"))
    args = parser.parse_args(argv)

    signature = serving_signature(args.saved_model)
    if args.inputs:
        with np.load(args.inputs) as archive:
            inputs = {name: archive[name] for name in signature.structured_input_signature[1]}
    else:
        inputs = example_inputs(signature, args.num_instances)
    body = predict_request(inputs)
    expected = expected_response(signature(**{k: tf.constant(v) for k, v in inputs.items()}))

    os.makedirs(args.out_dir, exist_ok=True)
    request_path = os.path.join(args.out_dir, "request.json")
    with open(request_path, "w") as file:
        json.dump(body, file)
    model_name = args.model_name or os.path.basename(os.path.dirname(os.path.abspath(args.saved_model)))
    print(f"request body ({len(inputs)} input(s): {', '.join(inputs)}) written to {request_path}")
    print(f"POST /v1/models/{model_name}:predict  ->  expected response (local SavedModel):")
    print(json.dumps(expected)[:400] + (" ..." if len(json.dumps(expected)) > 400 else ""))

    if args.server:
        response = post(f"{args.server.rstrip('/')}/v1/models/{model_name}:predict", body)
        check_response(response, expected)
        print("TF Serving's response matches the local SavedModel (format and values).")
    else:
        print("No --server given: start TF Serving (see above) and pass --server to check its answer.")
    return body, expected


if __name__ == "__main__":
    main()
