// BERT's WordPiece tokenizer, read from a Hugging Face tokenizer.json (BertNormalizer,
// BertPreTokenizer, WordPiece model, [CLS] ... [SEP] post-processing), as the uncased BERT models
// (all-MiniLM-L6-v2, bert-base-uncased) use it.
//
//   auto tok = wordpiece_tokenizer::from_json_file(".../tokenizer.json");
//   tok.encode("Hello, world!")        -> {101, 7592, 1010, 2088, 999, 102}   ([CLS] ... [SEP])
//   tok.encode(text, false)            -> the same without [CLS] / [SEP]
//   tok.basic_tokenize(text)           -> the normalised words and punctuation before WordPiece
//
// The pipeline, per Unicode code point of the UTF-8 input (invalid UTF-8: errc::invalid_argument):
//   1. clean_text: NUL, U+FFFD and control / format characters are dropped (Cc except \t \n \r,
//      and the BMP Cf characters such as U+00AD soft hyphen, U+200B..U+200F, U+FEFF); White_Space
//      characters become ' '.
//   2. handle_chinese_chars: CJK ideographs (the ranges BERT uses) are surrounded by spaces.
//   3. strip_accents (the default follows lowercase, as in BERT): what Unicode NFD followed by
//      removing the nonspacing marks does, for the precomposed letters of Latin-1 Supplement, Latin
//      Extended-A, -B and Additional (Vietnamese), Greek, Cyrillic, kana and Hangul syllables
//      ("Café" -> "Cafe", "ё" -> "е", "が" -> "か", a Hangul syllable -> its jamo), and the
//      nonspacing marks of the combining-diacritics blocks, Cyrillic, Hebrew, Arabic, Devanagari
//      and kana are dropped.
//   4. lowercase: ASCII, Latin-1, Latin Extended-A and Additional, Greek and Cyrillic capitals.
//   5. split on white space; every punctuation character (ASCII punctuation, and Unicode
//      punctuation in Latin-1, Greek, General Punctuation, CJK Symbols and Halfwidth / Fullwidth
//      Forms) is a word of its own.
//   6. WordPiece on each word: greedy longest match first, continuation pieces prefixed with "##";
//      a word with no full segmentation, or longer than max_input_chars_per_word code points,
//      becomes [UNK].
// Not handled (the text goes through unchanged and may tokenize differently from the Hugging Face
// tokenizer): NFD of other characters (e.g. U+2260 '≠' -> '=' + U+0338, Indic vowel signs, CJK
// compatibility ideographs), nonspacing marks of other scripts (Bengali, Thai, ...), other case
// mappings (Armenian, Georgian, Latin Extended-B, fullwidth, ...), punctuation and format
// characters outside the blocks above, unassigned and private-use code points (HF drops them),
// special tokens written in the text ("[MASK]" is tokenized as '[', 'mask', ']'), truncation and
// padding (encode returns every token; the model refuses more than its 512 positions), pairs of
// sequences.
// A malformed or unsupported tokenizer.json raises errc::io (or errc::unsupported for a normalizer,
// pre-tokenizer or model other than the BERT ones) naming the field.
#pragma once

#include <basisattn/core/config.hpp>
#include <basisattn/core/error.hpp>
#include <basisattn/io/bytes.hpp>

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace models {

struct wordpiece_tokenizer {
  std::unordered_map<std::string, std::int32_t> vocab;
  std::vector<std::string> id_to_token;  ///< inverse of vocab (empty string for unused ids)
  std::string continuing_prefix = "##";
  std::size_t max_input_chars_per_word = 100;
  std::int32_t unk_id = -1, cls_id = -1, sep_id = -1;
  bool clean_text = true, handle_chinese_chars = true, strip_accents = true, lowercase = true;

  static wordpiece_tokenizer from_json_file(const std::string& path) {
    const std::vector<unsigned char> bytes = basisattn::io::read_file(path);
    return from_json(std::string(bytes.begin(), bytes.end()), path);
  }

  static wordpiece_tokenizer from_json(const std::string& text, const std::string& source = "tokenizer.json") {
    using nlohmann::json;
    const json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
    BASISATTN_REQUIRE(!j.is_discarded(), io, source, ": not valid JSON");
    BASISATTN_REQUIRE(j.is_object(), io, source, ": the top level is not a JSON object");
    wordpiece_tokenizer t;
    auto flag = [&](const json& o, const char* key, bool fallback, const char* where) {
      if (!o.contains(key) || o[key].is_null()) return fallback;
      BASISATTN_REQUIRE(o[key].is_boolean(), io, source, ": ", where, ".", key, " must be a boolean or null");
      return o[key].get<bool>();
    };

    // Normalizer: BertNormalizer or none.
    if (j.contains("normalizer") && !j["normalizer"].is_null()) {
      const json& n = j["normalizer"];
      BASISATTN_REQUIRE(n.is_object() && n.contains("type") && n["type"].is_string(), io, source,
                        ": normalizer must be an object with a string 'type'");
      BASISATTN_REQUIRE(n["type"] == "BertNormalizer", unsupported, source, ": normalizer '",
                        n["type"].get<std::string>(), "' (only BertNormalizer is implemented)");
      t.clean_text = flag(n, "clean_text", true, "normalizer");
      t.handle_chinese_chars = flag(n, "handle_chinese_chars", true, "normalizer");
      t.lowercase = flag(n, "lowercase", true, "normalizer");
      t.strip_accents = flag(n, "strip_accents", t.lowercase, "normalizer");  // null: follows lowercase
    } else {
      t.clean_text = t.handle_chinese_chars = t.lowercase = t.strip_accents = false;
    }
    if (j.contains("pre_tokenizer") && !j["pre_tokenizer"].is_null()) {
      const json& p = j["pre_tokenizer"];
      BASISATTN_REQUIRE(p.is_object() && p.contains("type") && p["type"].is_string(), io, source,
                        ": pre_tokenizer must be an object with a string 'type'");
      BASISATTN_REQUIRE(p["type"] == "BertPreTokenizer", unsupported, source, ": pre_tokenizer '",
                        p["type"].get<std::string>(), "' (only BertPreTokenizer is implemented)");
    }

    // Model: WordPiece with its vocabulary.
    BASISATTN_REQUIRE(j.contains("model") && j["model"].is_object(), io, source, ": no 'model' object");
    const json& m = j["model"];
    BASISATTN_REQUIRE(m.contains("type") && m["type"].is_string(), io, source, ": model has no string 'type'");
    BASISATTN_REQUIRE(m["type"] == "WordPiece", unsupported, source, ": model type '", m["type"].get<std::string>(),
                      "' (only WordPiece is implemented)");
    BASISATTN_REQUIRE(m.contains("vocab") && m["vocab"].is_object() && !m["vocab"].empty(), io, source,
                      ": model.vocab must be a non-empty object of token -> id");
    const std::size_t n_vocab = m["vocab"].size();
    t.id_to_token.assign(n_vocab, std::string());
    std::vector<bool> used(n_vocab, false);
    for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
      const json& v = it.value();
      BASISATTN_REQUIRE(
          v.is_number_integer() && v.get<std::int64_t>() >= 0 && v.get<std::int64_t>() < std::int64_t(n_vocab), io,
          source, ": model.vocab['", it.key(), "'] must be an integer id in [0, ", n_vocab, "), got ", v.dump());
      const std::size_t id = static_cast<std::size_t>(v.get<std::int64_t>());
      BASISATTN_REQUIRE(!used[id], io, source, ": model.vocab gives id ", id, " to two tokens ('", t.id_to_token[id],
                        "' and '", it.key(), "')");
      used[id] = true;
      t.id_to_token[id] = it.key();
      t.vocab.emplace(it.key(), static_cast<std::int32_t>(id));
    }
    auto lookup = [&](const std::string& token, const char* role) {
      const auto it = t.vocab.find(token);
      BASISATTN_REQUIRE(it != t.vocab.end(), io, source, ": the ", role, " token '", token, "' is not in model.vocab");
      return it->second;
    };
    auto string_field = [&](const json& o, const char* key, const std::string& fallback, const char* where) {
      if (!o.contains(key) || o[key].is_null()) return fallback;
      BASISATTN_REQUIRE(o[key].is_string(), io, source, ": ", where, ".", key, " must be a string");
      return o[key].get<std::string>();
    };
    t.unk_id = lookup(string_field(m, "unk_token", "[UNK]", "model"), "unknown");
    t.continuing_prefix = string_field(m, "continuing_subword_prefix", "##", "model");
    if (m.contains("max_input_chars_per_word") && !m["max_input_chars_per_word"].is_null()) {
      const json& v = m["max_input_chars_per_word"];
      BASISATTN_REQUIRE(v.is_number_integer() && v.get<std::int64_t>() > 0, io, source,
                        ": model.max_input_chars_per_word must be a positive integer, got ", v.dump());
      t.max_input_chars_per_word = static_cast<std::size_t>(v.get<std::int64_t>());
    }

    // [CLS] / [SEP]: from a TemplateProcessing or BertProcessing post-processor, else by name.
    std::string cls = "[CLS]", sep = "[SEP]";
    if (j.contains("post_processor") && !j["post_processor"].is_null()) {
      const json& p = j["post_processor"];
      BASISATTN_REQUIRE(p.is_object() && p.contains("type") && p["type"].is_string(), io, source,
                        ": post_processor must be an object with a string 'type'");
      if (p["type"] == "BertProcessing") {
        for (const char* key : {"cls", "sep"}) {
          BASISATTN_REQUIRE(p.contains(key) && p[key].is_array() && p[key].size() == 2 && p[key][0].is_string(), io,
                            source, ": post_processor.", key, " must be [token, id]");
        }
        cls = p["cls"][0].get<std::string>();
        sep = p["sep"][0].get<std::string>();
      } else {
        BASISATTN_REQUIRE(p["type"] == "TemplateProcessing", unsupported, source, ": post_processor '",
                          p["type"].get<std::string>(), "' (BertProcessing and TemplateProcessing are implemented)");
      }
    }
    t.cls_id = lookup(cls, "classifier");
    t.sep_id = lookup(sep, "separator");
    return t;
  }

  /// Normalisation and pre-tokenization (steps 1-5): the words WordPiece sees, in UTF-8.
  std::vector<std::string> basic_tokenize(const std::string& text) const {
    const std::vector<char32_t> cps = decode_utf8(text);
    std::vector<char32_t> norm;
    norm.reserve(cps.size());
    for (char32_t c : cps) {
      if (clean_text) {
        if (c == 0 || c == 0xFFFD || is_control(c)) continue;
        if (is_whitespace(c)) c = U' ';
      }
      if (handle_chinese_chars && is_cjk(c)) {
        norm.push_back(U' '), norm.push_back(c), norm.push_back(U' ');
        continue;
      }
      const std::size_t first = norm.size();
      if (strip_accents)
        strip_accent_into(c, norm);
      else
        norm.push_back(c);
      if (lowercase)
        for (std::size_t i = first; i < norm.size(); ++i) norm[i] = to_lower(norm[i]);
    }
    std::vector<std::string> words;
    std::string cur;
    auto flush = [&] {
      if (!cur.empty()) words.push_back(cur), cur.clear();
    };
    for (char32_t c : norm) {
      if (is_whitespace(c)) {
        flush();
      } else if (is_punctuation(c)) {
        flush();
        append_utf8(cur, c);
        flush();
      } else {
        append_utf8(cur, c);
      }
    }
    flush();
    return words;
  }

  /// WordPiece ids of one pre-tokenized word (step 6): its pieces, or {unk_id}.
  std::vector<std::int32_t> wordpiece(const std::string& word) const {
    const std::vector<char32_t> cps = decode_utf8(word);
    if (cps.size() > max_input_chars_per_word) return {unk_id};
    // Byte offset of every code point boundary.
    std::vector<std::size_t> at(cps.size() + 1, 0);
    for (std::size_t i = 0; i < cps.size(); ++i) at[i + 1] = at[i] + utf8_length(cps[i]);
    std::vector<std::int32_t> out;
    std::size_t start = 0;
    while (start < cps.size()) {
      std::int32_t found = -1;
      std::size_t end = cps.size();
      for (; end > start; --end) {
        std::string piece = word.substr(at[start], at[end] - at[start]);
        if (start > 0) piece = continuing_prefix + piece;
        const auto it = vocab.find(piece);
        if (it != vocab.end()) {
          found = it->second;
          break;
        }
      }
      if (found < 0) return {unk_id};
      out.push_back(found);
      start = end;
    }
    return out;
  }

  /// Token ids of `text`, with [CLS] in front and [SEP] behind when add_special_tokens.
  std::vector<std::int32_t> encode(const std::string& text, bool add_special_tokens = true) const {
    std::vector<std::int32_t> ids;
    if (add_special_tokens) ids.push_back(cls_id);
    for (const std::string& w : basic_tokenize(text)) {
      const std::vector<std::int32_t> p = wordpiece(w);
      ids.insert(ids.end(), p.begin(), p.end());
    }
    if (add_special_tokens) ids.push_back(sep_id);
    return ids;
  }

  // ---- character classes and UTF-8 ------------------------------------------------------------

  static bool in_ranges(char32_t c, const char32_t (*r)[2], std::size_t n) {
    for (std::size_t i = 0; i < n; ++i)
      if (c >= r[i][0] && c <= r[i][1]) return true;
    return false;
  }
  static bool is_whitespace(char32_t c) {  // Unicode White_Space
    static const char32_t r[][2] = {{0x09, 0x0D},     {0x20, 0x20},     {0x85, 0x85},     {0xA0, 0xA0},
                                    {0x1680, 0x1680}, {0x2000, 0x200A}, {0x2028, 0x2029}, {0x202F, 0x202F},
                                    {0x205F, 0x205F}, {0x3000, 0x3000}};
    return in_ranges(c, r, sizeof r / sizeof r[0]);
  }
  static bool is_control(char32_t c) {  // Cc (but \t \n \r count as white space) and BMP Cf
    if (c == U'\t' || c == U'\n' || c == U'\r') return false;
    static const char32_t r[][2] = {{0x00, 0x1F},     {0x7F, 0x9F},     {0xAD, 0xAD},     {0x600, 0x605},
                                    {0x61C, 0x61C},   {0x6DD, 0x6DD},   {0x70F, 0x70F},   {0x890, 0x891},
                                    {0x8E2, 0x8E2},   {0x180E, 0x180E}, {0x200B, 0x200F}, {0x202A, 0x202E},
                                    {0x2060, 0x2064}, {0x2066, 0x206F}, {0xFEFF, 0xFEFF}, {0xFFF9, 0xFFFB}};
    return in_ranges(c, r, sizeof r / sizeof r[0]);
  }
  static bool is_cjk(char32_t c) {  // the CJK Unified Ideographs ranges of BERT's tokenizer
    static const char32_t r[][2] = {{0x4E00, 0x9FFF},   {0x3400, 0x4DBF},   {0x20000, 0x2A6DF}, {0x2A700, 0x2B73F},
                                    {0x2B740, 0x2B81F}, {0x2B820, 0x2CEAF}, {0xF900, 0xFAFF},   {0x2F800, 0x2FA1F}};
    return in_ranges(c, r, sizeof r / sizeof r[0]);
  }
  static bool is_punctuation(char32_t c) {
    if ((c >= 33 && c <= 47) || (c >= 58 && c <= 64) || (c >= 91 && c <= 96) || (c >= 123 && c <= 126)) return true;
    // Unicode general category P* in Latin-1, Greek, General Punctuation, CJK Symbols and
    // Halfwidth / Fullwidth Forms.
    static const char32_t r[][2] = {
        {0xA1, 0xA1},     {0xA7, 0xA7},     {0xAB, 0xAB},     {0xB6, 0xB7},     {0xBB, 0xBB},     {0xBF, 0xBF},
        {0x37E, 0x37E},   {0x387, 0x387},   {0x2010, 0x2027}, {0x2030, 0x2043}, {0x2045, 0x2051}, {0x2053, 0x205E},
        {0x207D, 0x207E}, {0x208D, 0x208E}, {0x3001, 0x3003}, {0x3008, 0x3011}, {0x3014, 0x301F}, {0x3030, 0x3030},
        {0x303D, 0x303D}, {0x30A0, 0x30A0}, {0x30FB, 0x30FB}, {0xFE10, 0xFE19}, {0xFE30, 0xFE52}, {0xFE54, 0xFE61},
        {0xFE63, 0xFE63}, {0xFE68, 0xFE68}, {0xFE6A, 0xFE6B}, {0xFF01, 0xFF03}, {0xFF05, 0xFF0A}, {0xFF0C, 0xFF0F},
        {0xFF1A, 0xFF1B}, {0xFF1F, 0xFF20}, {0xFF3B, 0xFF3D}, {0xFF3F, 0xFF3F}, {0xFF5B, 0xFF5B}, {0xFF5D, 0xFF5D},
        {0xFF5F, 0xFF65}};
    return in_ranges(c, r, sizeof r / sizeof r[0]);
  }
  /// Nonspacing marks (category Mn) in the blocks of combining diacritics, Cyrillic, Hebrew,
  /// Arabic, Devanagari and the kana voicing marks: removed when stripping accents.
  static bool is_nonspacing_mark(char32_t c) {
    static const char32_t r[][2] = {
        {0x300, 0x36F},   {0x483, 0x487},   {0x591, 0x5BD},   {0x5BF, 0x5BF},   {0x5C1, 0x5C2},
        {0x5C4, 0x5C5},   {0x5C7, 0x5C7},   {0x610, 0x61A},   {0x64B, 0x65F},   {0x670, 0x670},
        {0x900, 0x902},   {0x93A, 0x93A},   {0x93C, 0x93C},   {0x941, 0x948},   {0x94D, 0x94D},
        {0x951, 0x957},   {0x962, 0x963},   {0x1AB0, 0x1ABD}, {0x1ABF, 0x1ACE}, {0x1DC0, 0x1DFF},
        {0x20D0, 0x20DC}, {0x20E1, 0x20E1}, {0x20E5, 0x20F0}, {0x3099, 0x309A}, {0xFE20, 0xFE2F}};
    return in_ranges(c, r, sizeof r / sizeof r[0]);
  }
  /// Appends what NFD followed by removing the nonspacing marks makes of c, for the precomposed
  /// characters of Latin-1 Supplement, Latin Extended-A/B and Additional, Greek, Cyrillic, kana and
  /// Hangul syllables (decomposed into their jamo); any other c is appended unchanged.
  static void strip_accent_into(char32_t c, std::vector<char32_t>& out) {
    // The base letter where it is ASCII; '.': none, or not ASCII (then see `pairs`).
    static const char latin[] =
        "AAAAAA.CEEEEIIII.NOOOOO..UUUUY..aaaaaa.ceeeeiiii.nooooo..uuuuy.y"  // U+00C0..U+00FF
        "AaAaAaCcCcCcCcDd..EeEeEeEeEeGgGgGgGgHh..IiIiIiIiI...JjKk.LlLlLl."  // U+0100..U+013F
        "...NnNnNn...OoOoOo..RrRrRrSsSsSsSsTtTt..UuUuUuUuUuUuWwYyYZzZzZz."  // U+0140..U+017F
        "................................Oo.............Uu..............."  // U+0180..U+01BF
        ".............AaIiOoUuUuUuUuUu.AaAa....GgKkOoOo..j...Gg..NnAa...."  // U+01C0..U+01FF
        "AaAaEeEeIiIiOoOoRrRrUuUuSsTt..Hh......AaEeOoOoOoOoYy............"  // U+0200..U+023F
        "................";                                                 // U+0240..U+024F
    static const char latin_additional[] =
        "AaBbBbBbCcDdDdDdDdDdEeEeEeEeEeFfGgHhHhHhHhHhIiIiKkKkKkLlLlLlLlMm"   // U+1E00..U+1E3F
        "MmMmNnNnNnNnOoOoOoOoPpPpRrRrRrRrSsSsSsSsSsTtTtTtTtUuUuUuUuUuVvVv"   // U+1E40..U+1E7F
        "WwWwWwWwWwXxXxYyZzZzZzhtwy......AaAaAaAaAaAaAaAaAaAaAaAaEeEeEeEe"   // U+1E80..U+1EBF
        "EeEeEeEeIiIiOoOoOoOoOoOoOoOoOoOoOoOoUuUuUuUuUuUuUuYyYyYyYy......";  // U+1EC0..U+1EFF
    static_assert(sizeof latin == 0x250 - 0xC0 + 1 && sizeof latin_additional == 0x100 + 1, "one entry per code point");
    // Sorted (code point, base) pairs whose base is not ASCII.
    static const char32_t pairs[][2] = {
        {0x1E2, 0xC6},    {0x1E3, 0xE6},    {0x1EE, 0x1B7},   {0x1EF, 0x292},   {0x1FC, 0xC6},    {0x1FD, 0xE6},
        {0x1FE, 0xD8},    {0x1FF, 0xF8},    {0x374, 0x2B9},   {0x37E, 0x3B},    {0x385, 0xA8},    {0x386, 0x391},
        {0x387, 0xB7},    {0x388, 0x395},   {0x389, 0x397},   {0x38A, 0x399},   {0x38C, 0x39F},   {0x38E, 0x3A5},
        {0x38F, 0x3A9},   {0x390, 0x3B9},   {0x3AA, 0x399},   {0x3AB, 0x3A5},   {0x3AC, 0x3B1},   {0x3AD, 0x3B5},
        {0x3AE, 0x3B7},   {0x3AF, 0x3B9},   {0x3B0, 0x3C5},   {0x3CA, 0x3B9},   {0x3CB, 0x3C5},   {0x3CC, 0x3BF},
        {0x3CD, 0x3C5},   {0x3CE, 0x3C9},   {0x3D3, 0x3D2},   {0x3D4, 0x3D2},   {0x400, 0x415},   {0x401, 0x415},
        {0x403, 0x413},   {0x407, 0x406},   {0x40C, 0x41A},   {0x40D, 0x418},   {0x40E, 0x423},   {0x419, 0x418},
        {0x439, 0x438},   {0x450, 0x435},   {0x451, 0x435},   {0x453, 0x433},   {0x457, 0x456},   {0x45C, 0x43A},
        {0x45D, 0x438},   {0x45E, 0x443},   {0x476, 0x474},   {0x477, 0x475},   {0x4C1, 0x416},   {0x4C2, 0x436},
        {0x4D0, 0x410},   {0x4D1, 0x430},   {0x4D2, 0x410},   {0x4D3, 0x430},   {0x4D6, 0x415},   {0x4D7, 0x435},
        {0x4DA, 0x4D8},   {0x4DB, 0x4D9},   {0x4DC, 0x416},   {0x4DD, 0x436},   {0x4DE, 0x417},   {0x4DF, 0x437},
        {0x4E2, 0x418},   {0x4E3, 0x438},   {0x4E4, 0x418},   {0x4E5, 0x438},   {0x4E6, 0x41E},   {0x4E7, 0x43E},
        {0x4EA, 0x4E8},   {0x4EB, 0x4E9},   {0x4EC, 0x42D},   {0x4ED, 0x44D},   {0x4EE, 0x423},   {0x4EF, 0x443},
        {0x4F0, 0x423},   {0x4F1, 0x443},   {0x4F2, 0x423},   {0x4F3, 0x443},   {0x4F4, 0x427},   {0x4F5, 0x447},
        {0x4F8, 0x42B},   {0x4F9, 0x44B},   {0x1E9B, 0x17F},  {0x304C, 0x304B}, {0x304E, 0x304D}, {0x3050, 0x304F},
        {0x3052, 0x3051}, {0x3054, 0x3053}, {0x3056, 0x3055}, {0x3058, 0x3057}, {0x305A, 0x3059}, {0x305C, 0x305B},
        {0x305E, 0x305D}, {0x3060, 0x305F}, {0x3062, 0x3061}, {0x3065, 0x3064}, {0x3067, 0x3066}, {0x3069, 0x3068},
        {0x3070, 0x306F}, {0x3071, 0x306F}, {0x3073, 0x3072}, {0x3074, 0x3072}, {0x3076, 0x3075}, {0x3077, 0x3075},
        {0x3079, 0x3078}, {0x307A, 0x3078}, {0x307C, 0x307B}, {0x307D, 0x307B}, {0x3094, 0x3046}, {0x309E, 0x309D},
        {0x30AC, 0x30AB}, {0x30AE, 0x30AD}, {0x30B0, 0x30AF}, {0x30B2, 0x30B1}, {0x30B4, 0x30B3}, {0x30B6, 0x30B5},
        {0x30B8, 0x30B7}, {0x30BA, 0x30B9}, {0x30BC, 0x30BB}, {0x30BE, 0x30BD}, {0x30C0, 0x30BF}, {0x30C2, 0x30C1},
        {0x30C5, 0x30C4}, {0x30C7, 0x30C6}, {0x30C9, 0x30C8}, {0x30D0, 0x30CF}, {0x30D1, 0x30CF}, {0x30D3, 0x30D2},
        {0x30D4, 0x30D2}, {0x30D6, 0x30D5}, {0x30D7, 0x30D5}, {0x30D9, 0x30D8}, {0x30DA, 0x30D8}, {0x30DC, 0x30DB},
        {0x30DD, 0x30DB}, {0x30F4, 0x30A6}, {0x30F7, 0x30EF}, {0x30F8, 0x30F0}, {0x30F9, 0x30F1}, {0x30FA, 0x30F2},
        {0x30FE, 0x30FD}};
    if (is_nonspacing_mark(c)) return;
    if (c >= 0xC0 && c < 0x250 && latin[c - 0xC0] != '.') return out.push_back(char32_t(latin[c - 0xC0]));
    if (c >= 0x1E00 && c < 0x1F00 && latin_additional[c - 0x1E00] != '.')
      return out.push_back(char32_t(latin_additional[c - 0x1E00]));
    if (c >= 0xAC00 && c <= 0xD7A3) {  // Hangul syllable -> leading consonant, vowel (, trailing consonant)
      const char32_t s = c - 0xAC00;
      out.push_back(0x1100 + s / 588), out.push_back(0x1161 + (s % 588) / 28);
      if (s % 28 != 0) out.push_back(0x11A7 + s % 28);
      return;
    }
    const std::size_t n = sizeof pairs / sizeof pairs[0];
    std::size_t lo = 0, hi = n;
    while (lo < hi) {
      const std::size_t mid = (lo + hi) / 2;
      if (pairs[mid][0] < c)
        lo = mid + 1;
      else
        hi = mid;
    }
    out.push_back(lo < n && pairs[lo][0] == c ? pairs[lo][1] : c);
  }
  static char32_t to_lower(char32_t c) {
    if (c >= U'A' && c <= U'Z') return c + 32;
    if (c < 0xC0) return c;
    if (c <= 0xDE) return c == 0xD7 ? c : c + 0x20;  // Latin-1 capitals (not the multiplication sign)
    if (c >= 0x100 && c <= 0x17F) {                  // Latin Extended-A: case pairs
      if (c == 0x130) return U'i';                   // İ (HF: i + U+0307, which step 3 removes anyway)
      if (c == 0x178) return 0xFF;                   // Ÿ
      const bool odd_upper = (c >= 0x139 && c <= 0x148) || (c >= 0x179 && c <= 0x17E);
      if (c == 0x138 || c == 0x149 || c == 0x17F) return c;  // ĸ, ŉ, ſ: lowercase, no pair
      return (c % 2 == 1) == odd_upper ? c + 1 : c;
    }
    if (c >= 0x391 && c <= 0x3AB && c != 0x3A2) return c + 0x20;  // Greek
    if (c == 0x386) return 0x3AC;
    if (c >= 0x388 && c <= 0x38A) return c + 0x25;
    if (c == 0x38C) return 0x3CC;
    if (c == 0x38E || c == 0x38F) return c + 0x3F;
    if (c >= 0x410 && c <= 0x42F) return c + 0x20;  // Cyrillic А..Я
    if (c >= 0x400 && c <= 0x40F) return c + 0x50;  // Cyrillic Ѐ..Џ
    if (c == 0x4C0) return 0x4CF;
    if (c == 0x1E9E) return 0xDF;  // capital sharp s
    if ((c >= 0x460 && c <= 0x481) || (c >= 0x48A && c <= 0x4BF) || (c >= 0x4D0 && c <= 0x4FF) ||
        (c >= 0x1E00 && c <= 0x1E95) || (c >= 0x1EA0 && c <= 0x1EFF))
      return c % 2 == 0 ? c + 1 : c;  // Cyrillic extensions, Latin Extended Additional: even = capital
    if (c >= 0x4C1 && c <= 0x4CE) return c % 2 == 1 ? c + 1 : c;
    return c;
  }

  static std::vector<char32_t> decode_utf8(const std::string& s) {
    std::vector<char32_t> out;
    out.reserve(s.size());
    std::size_t i = 0;
    while (i < s.size()) {
      const unsigned char b = static_cast<unsigned char>(s[i]);
      std::size_t len = 0;
      char32_t c = 0, min = 0;
      if (b < 0x80)
        len = 1, c = b;
      else if ((b & 0xE0) == 0xC0)
        len = 2, c = b & 0x1F, min = 0x80;
      else if ((b & 0xF0) == 0xE0)
        len = 3, c = b & 0x0F, min = 0x800;
      else if ((b & 0xF8) == 0xF0)
        len = 4, c = b & 0x07, min = 0x10000;
      BASISATTN_REQUIRE(len != 0 && i + len <= s.size(), invalid_argument,
                        "wordpiece_tokenizer: invalid UTF-8 at byte ", i);
      for (std::size_t k = 1; k < len; ++k) {
        const unsigned char cb = static_cast<unsigned char>(s[i + k]);
        BASISATTN_REQUIRE((cb & 0xC0) == 0x80, invalid_argument, "wordpiece_tokenizer: invalid UTF-8 at byte ", i + k);
        c = (c << 6) | (cb & 0x3F);
      }
      BASISATTN_REQUIRE(c >= min && c <= 0x10FFFF && !(c >= 0xD800 && c <= 0xDFFF), invalid_argument,
                        "wordpiece_tokenizer: invalid UTF-8 (overlong, surrogate or out of range) at byte ", i);
      out.push_back(c);
      i += len;
    }
    return out;
  }
  static std::size_t utf8_length(char32_t c) { return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4; }
  static void append_utf8(std::string& s, char32_t c) {
    if (c < 0x80) {
      s.push_back(char(c));
    } else if (c < 0x800) {
      s.push_back(char(0xC0 | (c >> 6))), s.push_back(char(0x80 | (c & 0x3F)));
    } else if (c < 0x10000) {
      s.push_back(char(0xE0 | (c >> 12))), s.push_back(char(0x80 | ((c >> 6) & 0x3F))),
          s.push_back(char(0x80 | (c & 0x3F)));
    } else {
      s.push_back(char(0xF0 | (c >> 18))), s.push_back(char(0x80 | ((c >> 12) & 0x3F)));
      s.push_back(char(0x80 | ((c >> 6) & 0x3F))), s.push_back(char(0x80 | (c & 0x3F)));
    }
  }
};

}  // namespace models
