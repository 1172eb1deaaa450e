"""Writes every splice-proxy configuration embedded in deploy/ to its own file
so that `cargo xtask check-deploy` can run `splice-proxy check-config` on it:
the config.toml of each Kubernetes ConfigMap, and the config.toml that each
CloudFormation launch template's user data writes, its ${Parameter}
references filled in with the parameter's default or a sample value below.

Usage: python deploy_configs.py DEPLOY_DIR OUT_DIR
Prints one line per configuration: FILE<TAB>where it came from.
Runs in the validators' virtual environment (PyYAML, cfn-lint's decoder).
"""

import re
import sys
from pathlib import Path

import yaml
from cfnlint.decode import decode_str

# Values for template parameters that have no default.
SAMPLES = {
    "ApiServerHostName": "ABCDEF0123456789ABCDEF0123456789.gr7.us-east-1.eks.amazonaws.com",
    "AWS::StackName": "splice-proxy",
    "AWS::Region": "us-east-1",
}

CONFIG_HEREDOC = re.compile(r"cat > /etc/splice-proxy/config\.toml <<'CONFIG'\n(.*?)\nCONFIG\n", re.S)


def kubernetes(deploy):
    for path in sorted((deploy / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "ConfigMap" and "config.toml" in doc.get("data", {}):
                name = doc["metadata"]["name"]
                yield f"{path} (ConfigMap {name}, config.toml)", doc["data"]["config.toml"]


def cloudformation(deploy):
    for path in sorted((deploy / "cloudformation").glob("*.yaml")):
        template, errors = decode_str(path.read_text())
        if errors:
            sys.exit(f"{path}: cannot parse: {errors}")
        params = template.get("Parameters", {})

        def value(ref):
            key = ref.group(1)
            if "Default" in params.get(key, {}):
                return str(params[key]["Default"])
            if key in SAMPLES:
                return SAMPLES[key]
            sys.exit(f"{path}: no value for ${{{key}}} in the user data's config.toml: add a sample to {__file__}")

        for name, resource in template.get("Resources", {}).items():
            if resource.get("Type") != "AWS::EC2::LaunchTemplate":
                continue
            script = resource["Properties"]["LaunchTemplateData"]["UserData"]["Fn::Base64"]["Fn::Sub"]
            found = CONFIG_HEREDOC.search(script)
            if not found:
                sys.exit(f"{path}: the user data of {name} writes no /etc/splice-proxy/config.toml")
            text = re.sub(r"\$\{([^}!]+)\}", value, found.group(1))
            yield f"{path} ({name} user data, /etc/splice-proxy/config.toml)", text


def main():
    deploy, out = Path(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    found = list(kubernetes(deploy)) + list(cloudformation(deploy))
    if not found:
        sys.exit(f"no configuration found under {deploy}")
    for index, (source, text) in enumerate(found):
        file = out / f"config-{index}.toml"
        file.write_text(text)
        print(f"{file}\t{source}")


main()
