use std::fs;
use std::path::{Path, PathBuf};

use tempfile::TempDir;

use super::*;

/// A temporary gitlab-cloud-connector directory with one valid entry of each kind.
struct Layout {
    dir: TempDir,
}

fn mk_up(name: &str, extra: &str) -> String {
    format!(
        "---\nname: {name}\ndescription: Does {name}\ngroup: group::code creation\nfeature_category: code_suggestions\ndocumentation_url: https://docs.gitlab.com/\n{extra}"
    )
}

const REFS: &str =
    "backend_services:\n  - ai_gateway\nadd_ons:\n  - duo_pro\nlicense_types:\n  - premium\n";

impl Layout {
    fn new() -> Self {
        let layout = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        layout.write(
            "backend_services/ai_gateway.yml",
            "name: ai_gateway\nproject_url: https://gitlab.com/ai-assist\ngroup: group::ai framework\njwt_aud: gitlab-ai-gateway\n",
        );
        layout.write(
            "add_ons/duo_pro.yml",
            "name: duo_pro\ndescription: GitLab Duo Pro\n",
        );
        layout.write("add_ons/duo_enterprise.yml", "name: duo_enterprise\n");
        layout.write("license_types/premium.yml", "name: premium\n");
        layout.write("license_types/ultimate.yml", "---\nname: ultimate\n");
        layout.write(
            "unit_primitives/code_suggestions.yml",
            &mk_up("code_suggestions", REFS),
        );
        layout
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn load(&self) -> Result<Registry, ConfigError> {
        Registry::load(self.path())
    }

    /// Loads, expecting an error in `rel` at `line` whose message contains `needle`.
    fn fails(&self, rel: &str, line: u32, needle: &str) -> ConfigError {
        let err = self.load().expect_err("the registry should not load");
        assert_eq!(err.file, self.path().join(rel), "{err}");
        assert_eq!(err.line, line, "{err}");
        assert!(err.message.contains(needle), "{needle:?} not in {err}");
        err
    }
}

fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, text).unwrap();
    path
}

fn v(text: &str) -> GitlabVersion {
    text.parse().unwrap()
}

#[test]
fn every_file_kind_loads() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up(
            "duo_chat",
            "milestone: '16.9'\nintroduced_by_url: https://gitlab.com/mr/1\nunit_primitive_issue_url: https://gitlab.com/issue/1\ncut_off_date: 2024-10-17T00:00:00+00:00\nmin_gitlab_version: '16.9'\nmin_gitlab_version_for_free_access: '16.8'\ndeprecated_by_url: https://gitlab.com/mr/2\ndeprecation_message: Use something else\nbackend_services: [ai_gateway]\nadd_ons: [duo_pro, duo_enterprise]\nlicense_types: [premium, ultimate]\n",
        ),
    );
    layout.write(
        "services/duo_chat.yml",
        "name: duo_chat\nbasic_unit_primitive: duo_chat\ngitlab_realm:\n  - gitlab-com\n  - self-managed\ndescription: Chat\nunit_primitives:\n  - duo_chat\n  - code_suggestions\n",
    );
    // Not registry entries: ignored rather than rejected.
    layout.write("unit_primitives/README.md", "# notes");
    layout.write("unit_primitives/.hidden.yml", "garbage: [");
    let registry = layout.load().unwrap();

    let chat = registry.unit_primitive("duo_chat").unwrap();
    assert_eq!(chat.description, "Does duo_chat");
    assert_eq!(chat.group, "group::code creation");
    assert_eq!(chat.milestone.as_deref(), Some("16.9"));
    assert_eq!(
        chat.introduced_by_url.as_deref(),
        Some("https://gitlab.com/mr/1")
    );
    assert_eq!(
        chat.unit_primitive_issue_url.as_deref(),
        Some("https://gitlab.com/issue/1")
    );
    assert_eq!(
        chat.cut_off_date.as_ref().unwrap().unix_seconds(),
        1_729_123_200
    );
    assert_eq!(chat.min_gitlab_version, Some(v("16.9")));
    assert_eq!(chat.min_gitlab_version_for_free_access, Some(v("16.8")));
    assert_eq!(
        chat.deprecation,
        Some(Deprecation {
            message: Some("Use something else".into()),
            by_url: Some("https://gitlab.com/mr/2".into()),
        })
    );
    assert_eq!(chat.backend_services, ["ai_gateway"]);
    assert_eq!(chat.add_ons, ["duo_pro", "duo_enterprise"]);
    assert_eq!(chat.license_types, ["premium", "ultimate"]);

    let plain = registry.unit_primitive("code_suggestions").unwrap();
    assert_eq!(plain.cut_off_date, None);
    assert_eq!(plain.deprecation, None);

    let backend = registry.backend_service("ai_gateway").unwrap();
    assert_eq!(backend.jwt_aud, "gitlab-ai-gateway");
    assert_eq!(backend.project_url, "https://gitlab.com/ai-assist");
    assert_eq!(backend.group, "group::ai framework");

    let service = registry.service("duo_chat").unwrap();
    assert_eq!(service.basic_unit_primitive, "duo_chat");
    assert_eq!(
        service.gitlab_realms,
        [GitlabRealm::GitlabCom, GitlabRealm::SelfManaged]
    );
    assert_eq!(service.unit_primitives, ["duo_chat", "code_suggestions"]);

    let names: Vec<_> = registry
        .unit_primitives()
        .map(|up| up.name.as_str())
        .collect();
    assert_eq!(names, ["code_suggestions", "duo_chat"]);
    assert!(registry.delivered_by("duo_chat", "ai_gateway"));
    assert!(!registry.delivered_by("duo_chat", "other_backend"));
    assert!(!registry.delivered_by("nope", "ai_gateway"));
}

#[test]
fn service_defaults_basic_unit_primitive_to_the_first() {
    let layout = Layout::new();
    layout.write(
        "services/code_suggestions.yml",
        "name: code_suggestions\nunit_primitives: [code_suggestions]\n",
    );
    let registry = layout.load().unwrap();
    let service = registry.service("code_suggestions").unwrap();
    assert_eq!(service.basic_unit_primitive, "code_suggestions");
    assert!(service.gitlab_realms.is_empty());
}

#[test]
fn dangling_backend_service_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up(
            "duo_chat",
            "backend_services:\n  - ai_gateway\n  - ai_gatewy\n",
        ),
    );
    let err = layout.fails(
        "unit_primitives/duo_chat.yml",
        9,
        "backend service \"ai_gatewy\"",
    );
    assert!(
        err.message.contains("backend_services/ai_gatewy.yml"),
        "{err}"
    );
    assert!(err.message.contains("known: ai_gateway"), "{err}");
}

#[test]
fn dangling_add_on_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "add_ons:\n  - duo_pro\n  - duo_prp\n"),
    );
    let err = layout.fails("unit_primitives/duo_chat.yml", 9, "add-on \"duo_prp\"");
    assert!(
        err.message.contains("known: duo_enterprise, duo_pro"),
        "{err}"
    );
}

#[test]
fn dangling_license_type_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "license_types: [premium, gold]\n"),
    );
    layout.fails("unit_primitives/duo_chat.yml", 7, "license type \"gold\"");
}

#[test]
fn dangling_reference_from_a_service_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "services/duo_chat.yml",
        "name: duo_chat\nunit_primitives:\n  - code_suggestions\n  - duo_chatt\n",
    );
    layout.fails("services/duo_chat.yml", 4, "unit primitive \"duo_chatt\"");
}

#[test]
fn basic_unit_primitive_must_be_listed() {
    let layout = Layout::new();
    layout.write(
        "services/duo_chat.yml",
        "name: duo_chat\nbasic_unit_primitive: duo_chat\nunit_primitives:\n  - code_suggestions\n",
    );
    layout.fails(
        "services/duo_chat.yml",
        2,
        "not in its unit_primitives list",
    );
}

#[test]
fn unknown_gitlab_realm_is_rejected() {
    let layout = Layout::new();
    layout.write(
        "services/duo_chat.yml",
        "name: duo_chat\ngitlab_realm:\n  - saas\nunit_primitives: [code_suggestions]\n",
    );
    layout.fails("services/duo_chat.yml", 3, "gitlab-com");
}

#[test]
fn name_listed_twice_is_rejected() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "add_ons:\n  - duo_pro\n  - duo_pro\n"),
    );
    layout.fails("unit_primitives/duo_chat.yml", 9, "twice");
}

#[test]
fn duplicate_name_is_rejected() {
    let layout = Layout::new();
    layout.write("add_ons/duo_pro.yaml", "name: duo_pro\n");
    let err = layout.fails(
        "add_ons/duo_pro.yml",
        1,
        "add-on \"duo_pro\" is defined twice",
    );
    assert!(err.message.contains("duo_pro.yaml"), "{err}");
}

#[test]
fn file_name_must_match_name() {
    let layout = Layout::new();
    layout.write("unit_primitives/duo_chat.yml", &mk_up("duo_chats", ""));
    let err = layout.fails(
        "unit_primitives/duo_chat.yml",
        2,
        "file name says \"duo_chat\"",
    );
    assert!(
        err.message
            .contains("rename the file to duo_chats.yml or set `name: duo_chat`"),
        "{err}"
    );
}

#[test]
fn name_must_be_snake_case() {
    let layout = Layout::new();
    layout.write("license_types/Gold.yml", "name: Gold\n");
    layout.fails("license_types/Gold.yml", 1, "must be snake_case");
}

#[test]
fn bad_version_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up(
            "duo_chat",
            "min_gitlab_version: '16.9'\nmin_gitlab_version_for_free_access: 'v16'\n",
        ),
    );
    layout.fails(
        "unit_primitives/duo_chat.yml",
        8,
        "invalid GitLab version \"v16\"",
    );
}

#[test]
fn unquoted_version_keeps_its_text() {
    // YAML would read 16.10 as the float 16.1; the registry must see the text.
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "min_gitlab_version: 16.10\n"),
    );
    let registry = layout.load().unwrap();
    let up = registry.unit_primitive("duo_chat").unwrap();
    assert_eq!(up.min_gitlab_version, Some(v("16.10")));
}

#[test]
fn bad_date_names_the_line() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "cut_off_date: 2024-02-30T00:00:00+00:00\n"),
    );
    layout.fails("unit_primitives/duo_chat.yml", 7, "invalid date");
}

#[test]
fn unknown_key_warns_with_its_line_and_loads() {
    let layout = Layout::new();
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", "add_ons: [duo_pro]\nadd_on: duo_pro\n"),
    );
    let registry = layout.load().unwrap();
    assert_eq!(
        registry.unknown_fields(),
        [UnknownField {
            file: layout.path().join("unit_primitives/duo_chat.yml"),
            line: 8,
            field: "add_on".to_string(),
        }]
    );
    assert_eq!(
        registry.unit_primitive("duo_chat").unwrap().add_ons,
        ["duo_pro"]
    );
}

#[test]
fn missing_required_field_is_rejected() {
    let layout = Layout::new();
    layout.write(
        "backend_services/other.yml",
        "name: other\nproject_url: x\ngroup: y\n",
    );
    let err = layout.load().unwrap_err();
    assert_eq!(err.file, layout.path().join("backend_services/other.yml"));
    assert!(err.message.contains("jwt_aud"), "{err}");
}

#[test]
fn too_many_aliases_are_rejected() {
    let layout = Layout::new();
    let aliases = vec!["*a"; 300].join(", ");
    layout.write(
        "unit_primitives/duo_chat.yml",
        &mk_up("duo_chat", &format!("add_ons: [&a duo_pro, {aliases}]\n")),
    );
    let err = layout.load().unwrap_err();
    assert_eq!(err.file, layout.path().join("unit_primitives/duo_chat.yml"));
    assert!(err.message.contains("budget"), "{err}");
    assert!(err.message.contains("remove the anchors"), "{err}");
}

#[test]
fn deep_nesting_is_rejected() {
    // Under a key the loader does not know and skips, so only the budget can stop it.
    let dir = tempfile::tempdir().unwrap();
    let deep = format!(
        "services: {{}}\nnot_a_section: {}{}\n",
        "[".repeat(200),
        "]".repeat(200)
    );
    let path = write_file(&dir, "deep.yml", &deep);
    let err = Registry::load(&path).unwrap_err();
    assert_eq!(err.file, path);
    assert_eq!(err.line, 2, "{err}");
    assert!(err.message.contains("limit"), "{err}");
}

#[test]
fn oversized_file_is_rejected() {
    let layout = Layout::new();
    let big = format!("name: duo_chat\ndescription: {}\n", "x".repeat(1024 * 1024));
    layout.write("unit_primitives/duo_chat.yml", &big);
    layout.fails("unit_primitives/duo_chat.yml", 0, "larger than 1024 KiB");
}

#[test]
fn missing_unit_primitives_folder_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let err = Registry::load(dir.path()).unwrap_err();
    assert!(
        err.message
            .contains("not a gitlab-cloud-connector config directory"),
        "{err}"
    );
    let err = Registry::load(&dir.path().join("nowhere")).unwrap_err();
    assert!(
        err.message
            .contains("cannot read the unit primitive registry"),
        "{err}"
    );
}

#[test]
fn empty_file_is_rejected() {
    let layout = Layout::new();
    layout.write("add_ons/duo_core.yml", "");
    let err = layout.load().unwrap_err();
    assert_eq!(err.file, layout.path().join("add_ons/duo_core.yml"));
}

#[test]
fn shipped_layout_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector");
    let registry = Registry::load(&root).unwrap();
    for name in [
        "code_suggestions",
        "complete_code",
        "generate_code",
        "duo_chat",
        "documentation_search",
        "explain_vulnerability",
        "troubleshoot_job",
        "explain_code",
        "include_file_context",
    ] {
        let up = registry
            .unit_primitive(name)
            .unwrap_or_else(|| panic!("{name} missing"));
        assert!(registry.delivered_by(name, "ai_gateway"), "{name}");
        assert!(!up.description.is_empty(), "{name}");
    }
    // The four backends of GitLab's access_data.yml, named as the legacy file's audiences map.
    for (name, aud) in [
        ("ai_gateway", "gitlab-ai-gateway"),
        ("duo_workflow_service", "gitlab-duo-workflow-service"),
        ("observability_backend", "gitlab-observability-backend"),
        ("security_gateway", "gitlab-security-gateway"),
    ] {
        assert_eq!(registry.backend_service(name).unwrap().jwt_aud, aud);
    }
    assert!(
        registry.unknown_fields().is_empty(),
        "{:?}",
        registry.unknown_fields()
    );
    assert!(
        registry
            .unit_primitives()
            .any(|up| up.deprecation.is_some())
    );
    let names: Vec<_> = registry.unit_primitives().map(|up| &up.name).collect();
    assert!(names.is_sorted());
}

#[test]
fn shipped_legacy_file_matches_shipped_layout_where_they_overlap() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let layout = Registry::load(&root.join("cloud_connector")).unwrap();
    let legacy = Registry::load(&root.join("cloud_connector_legacy.yml")).unwrap();
    for up in legacy.unit_primitives() {
        let shipped = layout.unit_primitive(&up.name).unwrap();
        assert_eq!(
            up.min_gitlab_version, shipped.min_gitlab_version,
            "{}",
            up.name
        );
        assert_eq!(up.cut_off_date, shipped.cut_off_date, "{}", up.name);
        assert_eq!(up.backend_services, shipped.backend_services, "{}", up.name);
    }
}

const SEED_LEGACY: &str = "\
services:
  code_suggestions:
    backend: 'gitlab-ai-gateway'
    cut_off_date: 2024-02-15 00:00:00 UTC
    min_gitlab_version: '16.8'
    bundled_with:
      duo_pro:
        unit_primitives:
          - code_suggestions
  duo_chat:
    backend: 'gitlab-ai-gateway'
    min_gitlab_version_for_beta: '16.8'
    min_gitlab_version: '16.9'
    bundled_with:
      duo_pro:
        unit_primitives:
          - duo_chat
          - documentation_search
";

/// The directory layout that says what [`SEED_LEGACY`] says.
fn seed_layout() -> Layout {
    let layout = Layout {
        dir: tempfile::tempdir().unwrap(),
    };
    layout.write(
        "backend_services/ai_gateway.yml",
        "name: ai_gateway\nproject_url: ''\ngroup: ''\njwt_aud: gitlab-ai-gateway\n",
    );
    layout.write("add_ons/duo_pro.yml", "name: duo_pro\n");
    let bare = |name: &str, extra: &str| {
        format!(
            "name: {name}\ndescription: ''\ngroup: ''\nfeature_category: ''\ndocumentation_url: ''\nbackend_services: [ai_gateway]\nadd_ons: [duo_pro]\n{extra}"
        )
    };
    layout.write(
        "unit_primitives/code_suggestions.yml",
        &bare(
            "code_suggestions",
            "cut_off_date: 2024-02-15T00:00:00+00:00\nmin_gitlab_version: '16.8'\n",
        ),
    );
    for name in ["duo_chat", "documentation_search"] {
        layout.write(
            &format!("unit_primitives/{name}.yml"),
            &bare(
                name,
                "min_gitlab_version: '16.9'\nmin_gitlab_version_for_free_access: '16.8'\n",
            ),
        );
    }
    layout.write(
        "services/code_suggestions.yml",
        "name: code_suggestions\nunit_primitives: [code_suggestions]\n",
    );
    layout.write(
        "services/duo_chat.yml",
        "name: duo_chat\nbasic_unit_primitive: duo_chat\nunit_primitives: [duo_chat, documentation_search]\n",
    );
    layout
}

#[test]
fn legacy_file_and_equivalent_layout_agree() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = Registry::load(&write_file(&dir, "cloud_connector.yml", SEED_LEGACY)).unwrap();
    let layout = seed_layout().load().unwrap();

    let legacy_ups: Vec<_> = legacy.unit_primitives().collect();
    let layout_ups: Vec<_> = layout.unit_primitives().collect();
    assert_eq!(legacy_ups, layout_ups);
    assert_eq!(legacy_ups.len(), 3);
    assert_eq!(
        legacy.backend_services().collect::<Vec<_>>(),
        layout.backend_services().collect::<Vec<_>>()
    );
    assert_eq!(legacy.service("duo_chat"), layout.service("duo_chat"));
    assert_eq!(
        legacy.service("code_suggestions"),
        layout.service("code_suggestions")
    );

    let cs = legacy.unit_primitive("code_suggestions").unwrap();
    assert_eq!(
        cs.cut_off_date.as_ref().unwrap().as_str(),
        "2024-02-15 00:00:00 UTC"
    );
    assert_eq!(cs.add_ons, ["duo_pro"]);
    let search = legacy.unit_primitive("documentation_search").unwrap();
    assert_eq!(search.min_gitlab_version, Some(v("16.9")));
    assert_eq!(search.min_gitlab_version_for_free_access, Some(v("16.8")));
    assert!(legacy.delivered_by("documentation_search", "ai_gateway"));
}

#[test]
fn legacy_file_under_defaults_loads() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "defaults: &defaults\n{}\ndevelopment:\n  <<: *defaults\ntest:\n  <<: *defaults\nproduction:\n  <<: *defaults\n",
        SEED_LEGACY
            .lines()
            .map(|l| format!("  {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let registry = Registry::load(&write_file(&dir, "cloud_connector.yml", &text)).unwrap();
    assert_eq!(registry.unit_primitives().count(), 3);
}

#[test]
fn legacy_unit_primitive_in_two_services_takes_the_most_permissive_terms() {
    let dir = tempfile::tempdir().unwrap();
    let text = "\
services:
  duo_chat:
    backend: gitlab-ai-gateway
    cut_off_date: 2024-02-15 00:00:00 UTC
    min_gitlab_version: '17.0'
    bundled_with:
      duo_pro:
        unit_primitives: [duo_chat, include_file_context]
      duo_enterprise:
        unit_primitives: [include_file_context]
  explain_vulnerability:
    backend: gitlab-ai-gateway
    cut_off_date: 2024-06-01 00:00:00 UTC
    min_gitlab_version: '16.10'
    bundled_with:
      duo_enterprise:
        unit_primitives: [explain_vulnerability, include_file_context]
  code_suggestions:
    backend: gitlab-ai-gateway
    bundled_with:
      duo_pro:
        unit_primitives: [code_suggestions, duo_chat]
";
    let registry = Registry::load(&write_file(&dir, "legacy.yml", text)).unwrap();
    let file_ctx = registry.unit_primitive("include_file_context").unwrap();
    assert_eq!(file_ctx.min_gitlab_version, Some(v("16.10")));
    assert_eq!(
        file_ctx.cut_off_date.as_ref().unwrap().as_str(),
        "2024-06-01 00:00:00 UTC"
    );
    assert_eq!(file_ctx.add_ons, ["duo_pro", "duo_enterprise"]);
    // code_suggestions sets no limits, so duo_chat has none either.
    let chat = registry.unit_primitive("duo_chat").unwrap();
    assert_eq!(chat.min_gitlab_version, None);
    assert_eq!(chat.cut_off_date, None);
    let service = registry.service("explain_vulnerability").unwrap();
    assert_eq!(service.basic_unit_primitive, "explain_vulnerability");
    assert_eq!(
        registry
            .service("code_suggestions")
            .unwrap()
            .basic_unit_primitive,
        "code_suggestions"
    );
}

#[test]
fn legacy_errors_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, u32, &str)] = &[
        (
            "services:\n  cs:\n    backend: gitlab-ai-gateway\n    cut_off_date: 2024-02-15 00:00 UTC\n    bundled_with:\n      duo_pro:\n        unit_primitives: [cs]\n",
            4,
            "invalid date",
        ),
        (
            "services:\n  cs:\n    backend: gitlab-ai-gateway\n    min_gitlab_version: '16'\n    bundled_with:\n      duo_pro:\n        unit_primitives: [cs]\n",
            4,
            "invalid GitLab version",
        ),
        (
            "services:\n  cs:\n    backend: gitlab-ai-gateway\n    bundled_width:\n      duo_pro:\n        unit_primitives: [cs]\n",
            4,
            // The misspelt key is only a warning; the missing one is the error.
            "missing field `bundled_with`",
        ),
        (
            "services:\n  cs:\n    backend: gitlab-ai-gateway\n    bundled_with:\n      duo_pro:\n        unit_primitives:\n          - cs\n          - cs\n",
            8,
            "twice",
        ),
        (
            "services:\n  cs:\n    backend: gitlab-ai-gateway\n    min_gitlab_version_for_beta: '16.8'\n    min_gitlab_version_for_free_access: '16.8'\n    bundled_with:\n      duo_pro:\n        unit_primitives: [cs]\n",
            5,
            "keep one",
        ),
        (
            "services:\n  Code-Suggestions:\n    backend: gitlab-ai-gateway\n    bundled_with:\n      duo_pro:\n        unit_primitives: [cs]\n",
            2,
            "snake_case",
        ),
        (
            "services:\n  a:\n    backend: gitlab-ai-gateway\n    bundled_with:\n      duo_pro:\n        unit_primitives: [a]\n  b:\n    backend: ai-gateway\n    bundled_with:\n      duo_pro:\n        unit_primitives: [b]\n",
            8,
            "would both be called \"ai_gateway\"",
        ),
        (
            "services:\n  a:\n    backend: gitlab-ai-gateway\n    bundled_with: {}\n",
            4,
            "bundles no unit primitives",
        ),
        ("services: {}\n", 1, "`services` is empty"),
        ("service: {}\n", 1, "service"),
        ("other: 1\n", 1, "other"),
        ("{}\n", 0, "no `services` map found"),
        (
            "services:\n  a:\n    backend: gitlab-ai-gateway\n    bundled_with:\n      duo_pro:\n        unit_primitives: [a]\ndefaults:\n  services: {}\n",
            2,
            "both `services` and `defaults.services`",
        ),
    ];
    for (i, (text, line, needle)) in cases.iter().enumerate() {
        let path = write_file(&dir, &format!("case{i}.yml"), text);
        let err = Registry::load(&path).expect_err(text);
        assert_eq!(err.file, path, "{err}");
        assert_eq!(err.line, *line, "case {i}: {err}");
        assert!(
            err.message.contains(needle),
            "case {i}: {needle:?} not in {err}"
        );
    }
}

#[test]
fn legacy_alias_bomb_is_rejected() {
    // Hidden in a section the loader otherwise ignores, so only the budget can stop it.
    let dir = tempfile::tempdir().unwrap();
    let mut bomb = String::from("development:\n  a: &a [x, x, x, x, x, x, x, x, x, x]\n");
    let mut prev = 'a';
    for level in 'b'..='k' {
        let refs = vec![format!("*{prev}"); 10].join(", ");
        bomb.push_str(&format!("  {level}: &{level} [{refs}]\n"));
        prev = level;
    }
    let path = write_file(&dir, "bomb.yml", &bomb);
    let err = Registry::load(&path).unwrap_err();
    assert_eq!(err.file, path);
    assert!(err.message.contains("budget"), "{err}");
    assert!(err.message.contains("remove the anchors"), "{err}");
    assert!(err.message.contains("remove the anchors"), "{err}");
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/gitlab")
        .join(rel)
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()));
        } else {
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// The docs' unit primitive, backend service, add-on and license type examples, verbatim.
#[test]
fn gitlab_docs_layout_example_loads() {
    let registry = Registry::load(&fixture("docs_layout")).unwrap();
    let up = registry.unit_primitive("new_feature").unwrap();
    assert_eq!(
        up.cut_off_date,
        Some("2024-10-17T00:00:00Z".parse().unwrap())
    );
    assert_eq!(up.min_gitlab_version, Some("16.9".parse().unwrap()));
    assert_eq!(
        up.min_gitlab_version_for_free_access,
        Some("16.8".parse().unwrap())
    );
    assert_eq!(up.add_ons, ["duo_pro", "duo_enterprise"]);
    assert_eq!(up.license_types, ["premium", "ultimate"]);
    assert_eq!(up.group, "group::your_group");
    assert!(registry.delivered_by("new_feature", "ai_gateway"));
    let gateway = registry.backend_service("ai_gateway").unwrap();
    assert_eq!(gateway.jwt_aud, "gitlab-ai-gateway");
    assert_eq!(gateway.group, "group::ai framework");
    assert!(
        registry.unknown_fields().is_empty(),
        "{:?}",
        registry.unknown_fields()
    );

    // A route can require it, and the audience comes from the example's jwt_aud.
    let yaml = format!(
        "issuers: [{{url: https://customers.gitlab.com}}]
unit_primitives: {}
enforce_min_version: true
backends:
  - name: gw
    backend_service: ai_gateway
    routes:
      - prefix: /new/
        require: [new_feature]
",
        fixture("docs_layout").display()
    );
    crate::config::Config::from_yaml(&yaml, Path::new("/test/config.yaml")).unwrap();
}

/// The docs' service example (`services/duo_chat.yml`) verbatim, over the shipped registry,
/// which has every unit primitive it lists.
#[test]
fn gitlab_docs_service_example_loads_over_the_shipped_registry() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector"),
        dir.path(),
    );
    fs::copy(
        fixture("docs_service_duo_chat.yml"),
        dir.path().join("services/duo_chat.yml"),
    )
    .unwrap();
    let registry = Registry::load(dir.path()).unwrap();
    let chat = registry.service("duo_chat").unwrap();
    assert_eq!(chat.basic_unit_primitive, "duo_chat");
    assert_eq!(chat.unit_primitives.len(), 19);
    assert_eq!(
        chat.gitlab_realms,
        [GitlabRealm::GitlabCom, GitlabRealm::SelfManaged]
    );
}

/// The gem README's minimal files: no group, documentation_url or project_url.
#[test]
fn gitlab_cloud_connector_gem_readme_example_loads() {
    let registry = Registry::load(&fixture("gem_readme")).unwrap();
    assert_eq!(
        registry.unit_primitive("duo_chat").unwrap().description,
        "Duo Chat"
    );
    let gateway = registry.backend_service("ai_gateway").unwrap();
    assert_eq!(
        (gateway.description.as_str(), gateway.jwt_aud.as_str()),
        ("AI Gateway", "gitlab-ai-gateway")
    );
}

#[test]
fn gitlab_docs_legacy_example_loads() {
    let registry = Registry::load(&fixture("docs_legacy.yml")).unwrap();
    let chat = registry.unit_primitive("duo_chat").unwrap();
    assert_eq!(chat.min_gitlab_version, Some("16.9".parse().unwrap()));
    assert_eq!(
        chat.min_gitlab_version_for_free_access,
        Some("16.8".parse().unwrap())
    );
    assert_eq!(chat.cut_off_date, None);
    let code = registry.unit_primitive("code_suggestions").unwrap();
    assert_eq!(
        code.cut_off_date,
        Some("2024-02-15T00:00:00Z".parse().unwrap())
    );
}

/// GitLab's access_data.yml: four backends, `_irrelevant` / `_irrelevant_` pseudo add-ons.
/// Every unit primitive in it is in the shipped registry with the same backend, the add-ons
/// it is sold with, and the cut-off date.
#[test]
fn gitlab_access_data_yml_loads_and_agrees_with_the_shipped_registry() {
    let legacy = Registry::load(&fixture("access_data.yml")).unwrap();
    assert!(
        legacy.unknown_fields().is_empty(),
        "{:?}",
        legacy.unknown_fields()
    );
    let audiences: Vec<_> = legacy
        .backend_services()
        .map(|b| b.jwt_aud.as_str())
        .collect();
    assert_eq!(
        audiences,
        [
            "gitlab-ai-gateway",
            "gitlab-duo-workflow-service",
            "gitlab-observability-backend",
            "gitlab-security-gateway"
        ]
    );
    assert_eq!(legacy.unit_primitives().count(), 35);
    let scans = legacy.unit_primitive("security_scans").unwrap();
    assert!(scans.add_ons.is_empty());
    assert_eq!(scans.backend_services, ["security_gateway"]);
    assert!(!legacy.add_ons.iter().any(|a| a.starts_with('_')));

    let shipped =
        Registry::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/cloud_connector"))
            .unwrap();
    for up in legacy.unit_primitives() {
        let ours = shipped
            .unit_primitive(&up.name)
            .unwrap_or_else(|| panic!("{} missing from config/cloud_connector", up.name));
        assert_eq!(up.backend_services, ours.backend_services, "{}", up.name);
        let mut add_ons = up.add_ons.clone();
        add_ons.sort();
        let mut our_add_ons = ours.add_ons.clone();
        our_add_ons.sort();
        assert_eq!(add_ons, our_add_ons, "{}", up.name);
        // The legacy mapping takes the latest cut-off of all services that bundle a unit
        // primitive; self_hosted_models bundles code_suggestions with a later one than the
        // code_suggestions service's own, which the directory layout keeps.
        if up.name != "code_suggestions" {
            assert_eq!(up.cut_off_date, ours.cut_off_date, "{}", up.name);
        }
    }
}

/// The same services under CustomersDot's `defaults: &defaults` with environment sections.
#[test]
fn access_data_under_defaults_with_environment_sections_loads() {
    let text = fs::read_to_string(fixture("access_data.yml")).unwrap();
    let services = text
        .lines()
        .skip_while(|l| !l.starts_with("services:"))
        .map(|l| format!("  {l}\n"))
        .collect::<String>();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        &dir,
        "cloud_connector.yml",
        &format!(
            "defaults: &defaults\n{services}development:\n  <<: *defaults\ntest:\n  <<: *defaults\nstaging:\n  <<: *defaults\nproduction:\n  <<: *defaults\n"
        ),
    );
    let registry = Registry::load(&path).unwrap();
    assert_eq!(registry.unit_primitives().count(), 35);
    assert!(
        registry.unknown_fields().is_empty(),
        "{:?}",
        registry.unknown_fields()
    );
}

#[test]
fn unknown_fields_of_every_kind_warn_and_load() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("docs_layout"), dir.path());
    for rel in [
        "unit_primitives/new_feature.yml",
        "backend_services/ai_gateway.yml",
        "add_ons/duo_pro.yml",
        "license_types/premium.yml",
    ] {
        let path = dir.path().join(rel);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, format!("{text}owner: someone\n")).unwrap();
    }
    let registry = Registry::load(dir.path()).unwrap();
    assert_eq!(
        registry.unknown_fields().len(),
        4,
        "{:?}",
        registry.unknown_fields()
    );
    assert!(
        registry
            .unknown_fields()
            .iter()
            .all(|u| u.field == "owner" && u.line > 1)
    );

    let legacy = write_file(
        &dir,
        "legacy.yml",
        "services:\n  cs:\n    backend: gitlab-ai-gateway\n    owner: x\n    bundled_with:\n      duo_pro:\n        unit_primitives: [cs]\n        note: y\nversion: 2\n",
    );
    let registry = Registry::load(&legacy).unwrap();
    let found: Vec<_> = registry
        .unknown_fields()
        .iter()
        .map(|u| (u.field.as_str(), u.line))
        .collect();
    assert_eq!(
        found,
        [
            ("version", 9),
            ("services.cs.owner", 4),
            ("services.cs.bundled_with.duo_pro.note", 8)
        ]
    );
}

#[test]
fn dangling_reference_in_gitlab_layout_still_fails_with_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixture("docs_layout"), dir.path());
    fs::remove_file(dir.path().join("add_ons/duo_enterprise.yml")).unwrap();
    let err = Registry::load(dir.path()).unwrap_err();
    assert_eq!(err.file, dir.path().join("unit_primitives/new_feature.yml"));
    assert_eq!(err.line, 16, "{err}");
    assert!(err.message.contains("duo_enterprise"), "{err}");
}
